"""lb: an edge load balancer for IoT fleets, configured like HAProxy."""

__version__ = "0.1.0"
