"""wire.rpc messages against pycapnp's own rpc.capnp (and wire/tunnelrpc.capnp), both directions."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import capnp
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire import registration as reg
from tunnel_lab.wire import rpc

capnp.remove_import_hook()
_CAPNP_DIR = os.path.dirname(capnp.__file__)
# rpc.capnp imports /capnp/c++.capnp: the import path is the directory that holds the `capnp` package.
rpc_schema: Any = capnp.load(os.path.join(_CAPNP_DIR, "rpc.capnp"), imports=[os.path.dirname(_CAPNP_DIR)])
schema: Any = capnp.load(str(Path(reg.__file__).with_name("tunnelrpc.capnp")))
_methods = schema.RegistrationServer.schema.methods
PARAMS = _methods["registerConnection"].param_type
RESULTS = _methods["registerConnection"].result_type
UPDATE = _methods["updateLocalConfiguration"].param_type

TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
DATA = st.binary(max_size=48)
U8 = st.integers(min_value=0, max_value=255)
U32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
UUIDS = st.builds(uuid.UUID, bytes=st.binary(min_size=16, max_size=16))
register_params = st.builds(
    reg.RegisterConnectionParams,
    auth=st.builds(reg.TunnelAuth, account_tag=TEXT, tunnel_secret=DATA),
    tunnel_id=UUIDS,
    conn_index=U8,
    options=st.builds(
        reg.ConnectionOptions,
        client=st.builds(
            reg.ClientInfo,
            client_id=DATA,
            features=st.lists(TEXT, max_size=6).map(tuple),
            version=TEXT,
            arch=TEXT,
        ),
        origin_local_ip=DATA,
        replace_existing=st.booleans(),
        compression_quality=U8,
        num_previous_attempts=U8,
    ),
)
results = st.one_of(
    st.builds(
        reg.ConnectionDetails, uuid=UUIDS, location_name=TEXT, tunnel_is_remotely_managed=st.booleans()
    ),
    st.builds(
        reg.RegistrationError,
        cause=TEXT,
        retry_after_ns=st.integers(min_value=0, max_value=1 << 62),
        should_retry=st.booleans(),
    ),
)
TRANSFORMS = st.lists(st.integers(0, 65535), max_size=3).map(tuple)
targets = st.one_of(st.builds(rpc.ImportedCap, U32), st.builds(rpc.PromisedAnswer, U32, TRANSFORMS))


def _pycapnp(data: bytes) -> Any:
    return rpc_schema.Message.from_bytes(data)


# ------------------------------------------------------------------------------------------------
# Ours -> pycapnp


@given(U32)
def test_bootstrap_and_bootstrap_return(q: int) -> None:
    with _pycapnp(rpc.encode_bootstrap(q)) as m:
        assert m.which() == "bootstrap" and m.bootstrap.questionId == q
    with _pycapnp(rpc.encode_bootstrap_return(q)) as m:
        assert m.which() == "return"
        r = m.__getattr__("return")
        assert r.answerId == q and r.releaseParamCaps is False and r.which() == "results"
        caps = r.results.capTable
        assert len(caps) == 1 and caps[0].which() == "senderHosted" and caps[0].senderHosted == 0
        assert caps[0].attachedFd == 0xFF


@given(U32, targets, register_params)
def test_call_register_connection(q: int, target: rpc.Target, p: reg.RegisterConnectionParams) -> None:
    data = rpc.encode_call(
        q, target, reg.REGISTRATION_SERVER_ID, 0, lambda b, i: reg.write_register_params(b, i, p)
    )
    with _pycapnp(data) as m:
        call = m.call
        assert (call.questionId, call.interfaceId, call.methodId) == (q, reg.REGISTRATION_SERVER_ID, 0)
        assert call.sendResultsTo.which() == "caller"
        if isinstance(target, rpc.ImportedCap):
            assert call.target.which() == "importedCap" and call.target.importedCap == target.cap_id
        else:
            pa = call.target.promisedAnswer
            assert pa.questionId == target.question_id
            assert [op.getPointerField for op in pa.transform] == list(target.transform)
        assert len(call.params.capTable) == 0
        params = call.params.content.as_struct(PARAMS)
        assert params.auth.accountTag == p.auth.account_tag
        assert params.auth.tunnelSecret == p.auth.tunnel_secret
        assert params.tunnelId == p.tunnel_id.bytes and params.connIndex == p.conn_index
        assert list(params.options.client.features) == list(p.options.client.features)
        assert params.options.numPreviousAttempts == p.options.num_previous_attempts
    # And our own decoder agrees with our encoder.
    decoded = rpc.decode_rpc_message(capnp_segments(data))
    assert isinstance(decoded, rpc.CallMessage) and decoded.target == target
    assert reg.read_register_params(decoded.params.struct("p")) == p


def capnp_segments(data: bytes) -> list[bytes]:
    from tunnel_lab.wire.capnp import unframe

    return unframe(data)


@given(U32, results)
def test_return_register_results(q: int, result: reg.RegistrationResult) -> None:
    data = rpc.encode_return_results(q, lambda b, i: reg.write_register_results(b, i, result))
    with _pycapnp(data) as m:
        r = m.__getattr__("return")
        assert r.answerId == q and r.releaseParamCaps is False and r.which() == "results"
        assert len(r.results.capTable) == 0
        response = r.results.content.as_struct(RESULTS).result.result
        if isinstance(result, reg.ConnectionDetails):
            d = response.connectionDetails
            assert (uuid.UUID(bytes=d.uuid), d.locationName, d.tunnelIsRemotelyManaged) == (
                result.uuid,
                result.location_name,
                result.tunnel_is_remotely_managed,
            )
        else:
            e = response.error
            assert (e.cause, e.retryAfter, e.shouldRetry) == (
                result.cause,
                result.retry_after_ns,
                result.should_retry,
            )


@given(U32, TEXT, st.sampled_from(list(rpc.ExceptionType)))
def test_return_exception_and_abort(q: int, reason: str, etype: rpc.ExceptionType) -> None:
    with _pycapnp(rpc.encode_return_exception(q, reason, etype)) as m:
        r = m.__getattr__("return")
        assert r.answerId == q and r.which() == "exception"
        assert r.exception.reason == reason and r.exception.type == etype.name.lower()
    with _pycapnp(rpc.encode_abort(reason, etype)) as m:
        assert m.which() == "abort" and m.abort.reason == reason and m.abort.type == etype.name.lower()


@given(U32, st.booleans(), U32)
def test_finish_release_and_empty_return(q: int, release: bool, count: int) -> None:
    with _pycapnp(rpc.encode_finish(q, release)) as m:
        assert m.finish.questionId == q and m.finish.releaseResultCaps is release
        assert m.finish.requireEarlyCancellationWorkaround is True
    with _pycapnp(rpc.encode_release(q, count)) as m:
        assert (m.release.id, m.release.referenceCount) == (q, count)
    with _pycapnp(rpc.encode_return_results(q, None)) as m:
        r = m.__getattr__("return")
        assert r.answerId == q and r.results.content.as_struct(UPDATE).config == b""


# ------------------------------------------------------------------------------------------------
# pycapnp -> ours


def _framed(message: Any) -> bytes:
    return bytes(message.to_bytes())


class _Fragmented:
    """A pycapnp message whose segments are one word at first: far pointers everywhere."""

    def __init__(self) -> None:
        self.builder = capnp._MallocMessageBuilder(1)
        self.root = self.builder.init_root(rpc_schema.Message)

    def to_bytes(self) -> bytes:
        from tunnel_lab.wire.capnp import frame_message

        return frame_message([bytes(s) for s in self.builder.get_segments_for_output()])


def _call(q: int, method: int, target: rpc.Target | None = None, fragmented: bool = False) -> tuple[Any, Any]:
    m: Any = _Fragmented() if fragmented else rpc_schema.Message.new_message()
    call = (m.root if fragmented else m).init("call")
    call.questionId = q
    call.interfaceId = reg.REGISTRATION_SERVER_ID
    call.methodId = method
    if target is None or isinstance(target, rpc.ImportedCap):
        call.target.importedCap = target.cap_id if target else 0
    else:
        call.target.init("promisedAnswer").questionId = target.question_id
    call.params.init("capTable", 0)
    return m, call


def _fill_params(builder: Any, p: reg.RegisterConnectionParams) -> None:
    builder.auth.accountTag = p.auth.account_tag
    builder.auth.tunnelSecret = p.auth.tunnel_secret
    builder.tunnelId = p.tunnel_id.bytes
    builder.connIndex = p.conn_index
    o = p.options
    builder.options.client.clientId = o.client.client_id
    features = builder.options.client.init("features", len(o.client.features))
    for i, f in enumerate(o.client.features):
        features[i] = f
    builder.options.client.version = o.client.version
    builder.options.client.arch = o.client.arch
    builder.options.originLocalIp = o.origin_local_ip
    builder.options.replaceExisting = o.replace_existing
    builder.options.compressionQuality = o.compression_quality
    builder.options.numPreviousAttempts = o.num_previous_attempts


@given(register_params, DATA, st.booleans(), st.booleans())
def test_pycapnp_conversation_into_rpc_server(
    p: reg.RegisterConnectionParams, config: bytes, pipelined: bool, fragmented: bool
) -> None:
    server = rpc.RpcServer()
    boot = rpc_schema.Message.new_message()
    boot.init("bootstrap").questionId = 0
    assert server.receive_data(_framed(boot)) == []
    m, call = _call(1, 0, rpc.PromisedAnswer(0) if pipelined else rpc.ImportedCap(0), fragmented)
    _fill_params(call.params.content.as_struct(PARAMS), p)
    assert server.receive_data(_framed(m)) == [rpc.RegisterConnectionCalled(1, p)]
    m, call = _call(2, 2, fragmented=fragmented)
    call.params.content.as_struct(UPDATE).config = config
    assert server.receive_data(_framed(m)) == [rpc.UpdateLocalConfigurationCalled(2, config)]
    m, call = _call(3, 1)
    call.params.content.as_struct(_methods["unregisterConnection"].param_type)
    assert server.receive_data(_framed(m)) == [rpc.UnregisterConnectionCalled(3)]
    finish = rpc_schema.Message.new_message()
    finish.init("finish").questionId = 0
    release = rpc_schema.Message.new_message()
    release.init("release").id = 0
    release.release.referenceCount = 1
    abort = rpc_schema.Message.new_message()
    abort.init("abort").reason = "rpc: shutdown"
    assert server.receive_data(_framed(finish) + _framed(release) + _framed(abort)) == [
        rpc.RpcAborted("rpc: shutdown")
    ]


@given(results, st.booleans())
def test_pycapnp_returns_into_rpc_client(result: reg.RegistrationResult, fragmented: bool) -> None:
    client = rpc.RpcClient()
    params = reg.RegisterConnectionParams(
        reg.TunnelAuth("tag", b"s"),
        uuid.UUID(int=1),
        0,
        reg.ConnectionOptions(reg.ClientInfo(b"c" * 16, ("serialized_headers",), "v", "a"), bytes(16)),
    )
    assert client.register_connection(params) == 1
    client.data_to_send()
    # pycapnp cannot write a capability pointer without an RPC system: the bootstrap answer is ours
    # (checked against pycapnp above), with another export id.
    assert client.receive_data(rpc.encode_bootstrap_return(0, 4)) == []
    mb = capnp._MallocMessageBuilder(1 if fragmented else 512)
    answer = mb.init_root(rpc_schema.Message)
    r = answer.init("return")
    r.answerId = 1
    response = r.init("results").content.as_struct(RESULTS).result.result
    if isinstance(result, reg.ConnectionDetails):
        d = response.init("connectionDetails")
        d.uuid, d.locationName = result.uuid.bytes, result.location_name
        d.tunnelIsRemotelyManaged = result.tunnel_is_remotely_managed
    else:
        e = response.init("error")
        e.cause, e.retryAfter, e.shouldRetry = result.cause, result.retry_after_ns, result.should_retry
    stream = b"".join(_frame_segments(mb.get_segments_for_output()))
    assert client.receive_data(stream) == [rpc.RegistrationAnswered(1, result)]
    # Finish for both answers, as cloudflared does.
    sent = client.data_to_send()
    assert sent == rpc.encode_finish(0) + rpc.encode_finish(1)
    # The bootstrap capability's export id is used from now on.
    client.update_local_configuration(b"{}")
    call = rpc.decode_rpc_message(capnp_segments(client.data_to_send()))
    assert isinstance(call, rpc.CallMessage) and call.target == rpc.ImportedCap(4) and call.question_id == 1


def _frame_segments(segments: list[bytes]) -> list[bytes]:
    from tunnel_lab.wire.capnp import frame_message

    return [frame_message([bytes(s) for s in segments])]
