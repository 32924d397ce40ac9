"""Control surfaces (layer 2): how operators see and steer the emperor.

The control hub and its websocket API, ``trimperor ctl``'s requests, the
stats server, Prometheus metrics, health checks, the vassal log store and the
dashboard.
"""
