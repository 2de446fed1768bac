"""Configuration checks that need no server: a setting that cannot work is refused at
start-up, naming the key and the fix."""

from __future__ import annotations

import pytest

from connmgr import config as config_mod
from connmgr.errors import ConfigError


def test_a_peer_timeout_the_heartbeats_cannot_meet_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"\[mirror\] peer_timeout: must be more than twice heartbeat_interval"):
        config_mod.load(None, mirror={"heartbeat_interval": 1.0, "peer_timeout": 2.0})
    assert config_mod.load(None, mirror={"heartbeat_interval": 1.0, "peer_timeout": 2.5}).mirror.peer_timeout == 2.5


def test_a_buffered_message_limit_too_small_to_stream_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"\[server\] max_buffered_message: must be 0 .* or at least 65536, got 1000"):
        config_mod.load(None, server={"max_buffered_message": 1000})
    assert config_mod.load(None).server.max_buffered_message == 8 << 20
    assert config_mod.load(None, server={"max_buffered_message": 0}).server.max_buffered_message == 0
