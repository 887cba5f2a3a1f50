"""The web layer: the quart-trio app (chat page, health check, /v1/stream websocket) and its server.

Depends on streamer/ only through the engine object it is given; streamer/ never imports web/.
"""
