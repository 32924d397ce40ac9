"""Process and socket adapters (layer 2): what a vassal's life touches on the host.

The launcher and the spawners, privilege changes, held and armed sockets,
sd_notify and the uWSGI emperor channel.
"""
