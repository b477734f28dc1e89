"""The end-to-end demo: the seed 004 topology (devices -> lb -> three clustered broker nodes) on
this machine, started from nothing by ``./dev demo`` (``python -m demo``), and the same
topology in docker-compose.yml. :mod:`demo.topology` is the one description both read.
"""
