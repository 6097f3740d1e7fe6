"""The embedded Redis: its socket is the only way in, and only the user running casimg may use it."""

from __future__ import annotations

import stat

import redis

from casimg.embedded import EmbeddedRedis


def test_the_embedded_redis_listens_only_on_a_socket_of_mode_0700(tmp_path):
    embedded = EmbeddedRedis(tmp_path / "data")
    embedded.start()
    try:
        assert embedded.alive()
        mode = embedded.socket.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o700
        client = redis.Redis(unix_socket_path=str(embedded.socket), decode_responses=True)
        assert client.config_get("port")["port"] == "0"  # no TCP listener at all
        client.close()
    finally:
        embedded.stop()
    assert not embedded.alive()
