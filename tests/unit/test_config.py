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


@pytest.mark.parametrize(("host", "message"), [
    ({"vip": "198.18.0.100"}, r"\[host\] vip: needs its prefix length, as in 198.18.0.100/24"),
    ({"vip": "fd00::1/64"}, r"\[host\] vip: expected an IPv4 address .*IPv6 is not supported yet"),
    ({"vip": "198.18.0.100/24"}, r"\[host\] etcd: host takeover needs the etcd members' URLs"),
    ({"vip": "198.18.0.100/24", "etcd": "198.18.0.3:2379"}, r"\[host\] etcd: expected http://host:port"),
    ({"vip": "198.18.0.100/24", "etcd": ["http://e:2379"], "key": "leader"}, r"\[host\] key: must start with /"),
    ({"vip": "198.18.0.100/24", "etcd": ["http://e:2379"], "lease_ttl": 1.0, "lease_margin": 1.0},
     r"\[host\] lease_margin: must be below lease_ttl"),
    ({"vip": "198.18.0.100/24", "etcd": ["http://e:2379"], "lease_ttl": 2.0, "renew_interval": 1.5},
     r"\[host\] renew_interval: must be above 0 and below lease_ttl - lease_margin \(1.5 s\)"),
])  # fmt: skip
def test_host_takeover_settings_that_cannot_work_are_refused_by_name(host, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, host=host)


def test_host_takeover_is_off_by_default_and_takes_a_list_of_members():
    assert config_mod.load(None).host.vip == ""
    h = config_mod.load(None, host={"vip": "198.18.0.100/24", "etcd": ["http://a:2379", "http://w:2379"]}).host
    assert h.etcd == ("http://a:2379", "http://w:2379") and h.lease_ttl == 2.0
