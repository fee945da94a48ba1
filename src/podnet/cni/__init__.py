"""The CNI plugin (spec 1.1): a thin executable (plugin.py) that hands each request to the node
agent over a unix socket, and the agent side that serves it (server.py, handler.py).

plugin.py is run on its own by the container runtime and imports nothing from podnet.
"""
