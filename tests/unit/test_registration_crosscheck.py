"""wire.registration against pycapnp and wire/tunnelrpc.capnp: ids, layouts, both directions, round trips."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import capnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire import registration as reg
from tunnel_lab.wire.capnp import Message, MessageBuilder
from tunnel_lab.wire.errors import CapnpError

SCHEMA_PATH = Path(reg.__file__).with_name("tunnelrpc.capnp")
capnp.remove_import_hook()
schema: Any = capnp.load(str(SCHEMA_PATH))
_methods = schema.RegistrationServer.schema.methods
RegisterParams: Any = capnp.lib.capnp._StructModule(_methods["registerConnection"].param_type,
                                                    "RegisterParams")
RegisterResults: Any = capnp.lib.capnp._StructModule(_methods["registerConnection"].result_type,
                                                     "RegisterResults")
UpdateParams: Any = capnp.lib.capnp._StructModule(_methods["updateLocalConfiguration"].param_type,
                                                  "UpdateParams")

TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
DATA = st.binary(max_size=64)
UUIDS = st.builds(uuid.UUID, bytes=st.binary(min_size=16, max_size=16))
U8 = st.integers(min_value=0, max_value=255)

client_infos = st.builds(reg.ClientInfo, client_id=DATA, features=st.lists(TEXT, max_size=8).map(tuple),
                         version=TEXT, arch=TEXT)
connection_options = st.builds(reg.ConnectionOptions, client=client_infos, origin_local_ip=DATA,
                               replace_existing=st.booleans(), compression_quality=U8,
                               num_previous_attempts=U8)
register_params = st.builds(reg.RegisterConnectionParams,
                            auth=st.builds(reg.TunnelAuth, account_tag=TEXT, tunnel_secret=DATA),
                            tunnel_id=UUIDS, conn_index=U8, options=connection_options)
details = st.builds(reg.ConnectionDetails, uuid=UUIDS, location_name=TEXT,
                    tunnel_is_remotely_managed=st.booleans())
errors = st.builds(reg.RegistrationError, cause=TEXT,
                   retry_after_ns=st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
                   should_retry=st.booleans())
results = st.one_of(details, errors)


# ------------------------------------------------------------------------------------------------
# The schema file says what docs/protocol.md §3.5 says


def _node_id(struct_module: Any) -> int:
    return int(struct_module.schema.node.id)


def test_schema_ids_match_protocol() -> None:
    assert int(schema.schema.node.id) == reg.FILE_ID == 0xDB8274F9144ABC7E
    assert int(schema.TunnelAuth.schema.node.scopeId) == reg.FILE_ID
    expected = {"TunnelAuth": 0x9496331AB9CD463F, "ClientInfo": 0x83CED0145B2F114B,
                "ConnectionOptions": 0xB4BF9861FE035D04, "ConnectionResponse": 0xDBAA9D03D52B62DC,
                "ConnectionError": 0xF5F383D2785EDB86, "ConnectionDetails": 0xB5F39F082B9AC18A,
                "UpdateConfigurationResponse": 0xDB58FF694BA05CF9,
                "RegisterUdpSessionResponse": 0xAB6D5210C1F26687,
                "Tag": 0xCBD96442AE3BB01A}
    assert {name: _node_id(getattr(schema, name)) for name in expected} == expected
    assert int(schema.RegistrationServer.schema.node.id) == reg.REGISTRATION_SERVER_ID
    assert int(schema.SessionManager.schema.node.id) == 0x839445A59FB01686
    assert int(schema.ConfigurationManager.schema.node.id) == 0xB48EDFBDAA25DB04
    assert int(schema.CloudflaredServer.schema.node.id) == 0xF548CEF9DEA2A4A1
    group = next(f for f in schema.ConnectionResponse.schema.node.struct.fields if f.name == "result")
    assert int(group.group.typeId) == 0x97B3C5C260257622


def test_method_ordinals_and_implicit_struct_ids() -> None:
    methods = {m.name: m for m in schema.RegistrationServer.schema.node.interface.methods}
    assert {name: m.codeOrder for name, m in methods.items()} == {
        "registerConnection": 0, "unregisterConnection": 1, "updateLocalConfiguration": 2}
    assert reg.METHOD_NAMES == {0: "registerConnection", 1: "unregisterConnection",
                                2: "updateLocalConfiguration"}
    ids = {name: (int(m.paramStructType), int(m.resultStructType)) for name, m in methods.items()}
    assert ids == {"registerConnection": (0xE6646DEC8FEAA6EE, 0xEA50D822450D1F17),
                   "unregisterConnection": (0xF9CB7F4431A307D0, 0xB046E578094B1EAD),
                   "updateLocalConfiguration": (0xC5D6E311876A3604, 0xE5CEAE5D6897D7BE)}


@pytest.mark.parametrize(("struct", "size", "offsets"), [
    ("TunnelAuth", (0, 2), {"accountTag": 0, "tunnelSecret": 1}),
    ("ClientInfo", (0, 4), {"clientId": 0, "features": 1, "version": 2, "arch": 3}),
    ("ConnectionOptions", (1, 2), {"client": 0, "originLocalIp": 1, "replaceExisting": 0,
                                   "compressionQuality": 1, "numPreviousAttempts": 2}),
    ("ConnectionError", (2, 1), {"cause": 0, "retryAfter": 0, "shouldRetry": 64}),
    ("ConnectionDetails", (1, 2), {"uuid": 0, "locationName": 1, "tunnelIsRemotelyManaged": 0}),
])
def test_struct_layouts_match_protocol(struct: str, size: tuple[int, int], offsets: dict[str, int]) -> None:
    node = getattr(schema, struct).schema.node
    assert (node.struct.dataWordCount, node.struct.pointerCount) == size
    assert {f.name: f.slot.offset for f in node.struct.fields} == offsets


def test_register_params_layout() -> None:
    node = _methods["registerConnection"].param_type.node
    assert (node.struct.dataWordCount, node.struct.pointerCount) == (1, 3)
    assert {f.name: f.slot.offset for f in node.struct.fields} == {
        "auth": 0, "tunnelId": 1, "connIndex": 0, "options": 2}


# ------------------------------------------------------------------------------------------------
# Ours -> pycapnp


def _check_params(m: Any, p: reg.RegisterConnectionParams) -> None:
    assert m.auth.accountTag == p.auth.account_tag
    assert m.auth.tunnelSecret == p.auth.tunnel_secret
    assert m.tunnelId == p.tunnel_id.bytes
    assert m.connIndex == p.conn_index
    o, c = m.options, m.options.client
    assert c.clientId == p.options.client.client_id
    assert list(c.features) == list(p.options.client.features)
    assert (c.version, c.arch) == (p.options.client.version, p.options.client.arch)
    assert o.originLocalIp == p.options.origin_local_ip
    assert o.replaceExisting == p.options.replace_existing
    assert o.compressionQuality == p.options.compression_quality
    assert o.numPreviousAttempts == p.options.num_previous_attempts


@given(register_params)
def test_register_params_ours_to_pycapnp(p: reg.RegisterConnectionParams) -> None:
    with RegisterParams.from_bytes(reg.encode_register_params(p)) as m:
        _check_params(m, p)


def _check_result(m: Any, result: reg.RegistrationResult) -> None:
    if isinstance(result, reg.ConnectionDetails):
        assert m.which() == "connectionDetails"
        d = m.connectionDetails
        assert (d.uuid, d.locationName, d.tunnelIsRemotelyManaged) == (
            result.uuid.bytes, result.location_name, result.tunnel_is_remotely_managed)
    else:
        assert m.which() == "error"
        e = m.error
        assert (e.cause, e.retryAfter, e.shouldRetry) == (
            result.cause, result.retry_after_ns, result.should_retry)


@given(results)
def test_register_results_ours_to_pycapnp(result: reg.RegistrationResult) -> None:
    with RegisterResults.from_bytes(reg.encode_register_results(result)) as m:
        _check_result(m.result.result, result)
    with schema.ConnectionResponse.from_bytes(reg.encode_connection_response(result)) as m:
        _check_result(m.result, result)


@given(DATA)
def test_update_configuration_ours_to_pycapnp(config: bytes) -> None:
    with UpdateParams.from_bytes(reg.encode_update_configuration_params(config)) as m:
        assert m.config == config


# ------------------------------------------------------------------------------------------------
# pycapnp -> ours (also multi-segment: a 1-word first segment forces far pointers everywhere)


def _build_params(builder: Any, p: reg.RegisterConnectionParams) -> None:
    builder.auth.accountTag = p.auth.account_tag
    builder.auth.tunnelSecret = p.auth.tunnel_secret
    builder.tunnelId = p.tunnel_id.bytes
    builder.connIndex = p.conn_index
    o = builder.options
    o.client.clientId = p.options.client.client_id
    features = o.client.init("features", len(p.options.client.features))
    for i, f in enumerate(p.options.client.features):
        features[i] = f
    o.client.version = p.options.client.version
    o.client.arch = p.options.client.arch
    o.originLocalIp = p.options.origin_local_ip
    o.replaceExisting = p.options.replace_existing
    o.compressionQuality = p.options.compression_quality
    o.numPreviousAttempts = p.options.num_previous_attempts


@given(register_params, st.booleans())
def test_register_params_pycapnp_to_ours(p: reg.RegisterConnectionParams, fragmented: bool) -> None:
    if fragmented:
        mb = capnp._MallocMessageBuilder(1)
        _build_params(mb.init_root(RegisterParams), p)
        segments = [bytes(s) for s in mb.get_segments_for_output()]
    else:
        m = RegisterParams.new_message()
        _build_params(m, p)
        segments = [bytes(s) for s in m.to_segments()]
    assert reg.read_register_params(Message(segments).root()) == p


@given(results, st.booleans())
def test_connection_response_pycapnp_to_ours(result: reg.RegistrationResult, fragmented: bool) -> None:
    mb = capnp._MallocMessageBuilder(1 if fragmented else 1024)
    m = mb.init_root(schema.ConnectionResponse)
    if isinstance(result, reg.ConnectionDetails):
        d = m.result.init("connectionDetails")
        d.uuid, d.locationName = result.uuid.bytes, result.location_name
        d.tunnelIsRemotelyManaged = result.tunnel_is_remotely_managed
    else:
        e = m.result.init("error")
        e.cause, e.retryAfter, e.shouldRetry = result.cause, result.retry_after_ns, result.should_retry
    segments = [bytes(s) for s in mb.get_segments_for_output()]
    assert reg.read_connection_response(Message(segments).root()) == result


# ------------------------------------------------------------------------------------------------
# Our own round trips and validation


@given(register_params)
def test_register_params_round_trip(p: reg.RegisterConnectionParams) -> None:
    assert reg.decode_register_params(reg.encode_register_params(p)) == p
    assert reg.decode_tunnel_auth(reg.encode_tunnel_auth(p.auth)) == p.auth
    assert reg.decode_connection_options(reg.encode_connection_options(p.options)) == p.options
    assert reg.decode_client_info(reg.encode_client_info(p.options.client)) == p.options.client


@given(results)
def test_results_round_trip(result: reg.RegistrationResult) -> None:
    assert reg.decode_register_results(reg.encode_register_results(result)) == result
    assert reg.decode_connection_response(reg.encode_connection_response(result)) == result
    if isinstance(result, reg.ConnectionDetails):
        assert reg.decode_connection_details(reg.encode_connection_details(result)) == result
    else:
        assert reg.decode_registration_error(reg.encode_registration_error(result)) == result


@given(DATA)
def test_update_configuration_round_trip(config: bytes) -> None:
    assert reg.decode_update_configuration_params(reg.encode_update_configuration_params(config)) == config


@pytest.mark.parametrize("size", [0, 15, 17])
def test_connection_details_uuid_must_be_16_bytes(size: int) -> None:
    m = schema.ConnectionDetails.new_message(uuid=b"u" * size, locationName="LAB")
    with pytest.raises(CapnpError, match=f"uuid: {size} bytes, must be exactly 16"):
        reg.decode_connection_details(m.to_bytes())


def test_tunnel_id_must_be_16_bytes() -> None:
    m = RegisterParams.new_message(tunnelId=b"short")
    with pytest.raises(CapnpError, match="tunnelId: 5 bytes"):
        reg.decode_register_params(m.to_bytes())


def test_unknown_connection_response_tag() -> None:
    msg = MessageBuilder()
    msg.init_root(1, 1).set_u16(0, 7)
    with pytest.raises(CapnpError, match="unknown union tag 7"):
        reg.decode_connection_response(msg.to_bytes())


def test_dataclasses_validate_themselves() -> None:
    client = reg.ClientInfo(b"", ["a"], "v", "arch")  # type: ignore[arg-type]
    assert client.features == ("a",)
    with pytest.raises(ValueError, match="conn_index"):
        reg.RegisterConnectionParams(reg.TunnelAuth("a", b""), uuid.uuid4(), 256,
                                     reg.ConnectionOptions(client, b""))
    with pytest.raises(ValueError, match="num_previous_attempts"):
        reg.ConnectionOptions(client, b"", num_previous_attempts=-1)
    with pytest.raises(TypeError, match="tunnel_secret"):
        reg.TunnelAuth("a", "secret")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uuid"):
        reg.ConnectionDetails(b"x" * 16, "LAB")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Int64"):
        reg.RegistrationError("x", retry_after_ns=1 << 63)


def test_secrets_stay_out_of_repr() -> None:
    auth = reg.TunnelAuth("tag", b"\x01supersecret")
    assert "supersecret" not in repr(auth) and "12 bytes" in repr(auth)


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1", "00000000000000000000ffff7f000001"),
    ("::1", "00000000000000000000000000000001"),
    ("fe80::1%eth0", "fe800000000000000000000000000001"),
])
def test_origin_local_ip_bytes(address: str, expected: str) -> None:
    assert reg.origin_local_ip_bytes(address).hex() == expected
