"""broker: a small MQTT 3.1.1/5.0 broker node that sits behind lb."""

__version__ = "0.1.0"
