"""Sans-I/O Cap'n Proto RPC for the control stream: the edge's `RpcServer`, the connector's `RpcClient`.

On the control stream the connector is the RPC *client*: it sends `Bootstrap`, then calls
`RegistrationServer` methods on the capability the edge hands out; the edge is the RPC *server* and
exports exactly one capability (export id 0). Both sides speak the subset of the two-party protocol
that cloudflared's Go library uses (docs/protocol.md §3.2-§3.4):

    c->e Bootstrap q0; Call q1 registerConnection on promisedAnswer(q0)   (pipelined)
    e->c Return a0 (cap #0 = senderHosted 0); Return a1 (ConnectionResponse)
    c->e Finish q0; Finish q1; Call q1 (id reused) updateLocalConfiguration on importedCap 0; ...
    c->e Call unregisterConnection; Finish; Release 0; Abort "rpc: shutdown"

Usage is h11-style: `receive_data(bytes) -> list[event]`, `data_to_send() -> bytes`. Malformed bytes
raise `CapnpError`, a message that makes no sense in the conversation raises `RpcError`; after either
the shell should drop the connection. A well-formed call the server cannot serve is answered with a
`Return.exception` and the connection carries on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tunnel_lab.wire.capnp import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Message,
    MessageBuilder,
    MessageReader,
    StructBuilder,
    StructReader,
)
from tunnel_lab.wire.errors import CapnpError, RpcError
from tunnel_lab.wire.registration import (
    METHOD_NAMES,
    METHOD_REGISTER_CONNECTION,
    METHOD_UNREGISTER_CONNECTION,
    METHOD_UPDATE_LOCAL_CONFIGURATION,
    REGISTRATION_SERVER_ID,
    ConnectionDetails,
    RegisterConnectionParams,
    RegistrationError,
    RegistrationResult,
    read_register_params,
    read_register_results,
    read_update_configuration_params,
    write_register_params,
    write_register_results,
    write_update_configuration_params,
)

# rpc.capnp Message union tags.
TAG_UNIMPLEMENTED = 0
TAG_ABORT = 1
TAG_CALL = 2
TAG_RETURN = 3
TAG_FINISH = 4
TAG_RESOLVE = 5
TAG_RELEASE = 6
TAG_BOOTSTRAP = 8
TAG_DISEMBARGO = 13

_RETURN_KINDS = ("results", "exception", "canceled", "resultsSentElsewhere", "takeFromOtherQuestion",
                 "acceptFromThirdParty")
_CAP_KINDS = ("none", "senderHosted", "senderPromise", "receiverHosted", "receiverAnswer", "thirdPartyHosted")

#: The one capability the edge exports: its RegistrationServer.
BOOTSTRAP_EXPORT_ID = 0


class ExceptionType(enum.IntEnum):
    """rpc.capnp Exception.Type."""

    FAILED = 0
    OVERLOADED = 1
    DISCONNECTED = 2
    UNIMPLEMENTED = 3


# --------------------------------------------------------------------------------------------------
# Decoded RPC messages


@dataclass(frozen=True)
class ImportedCap:
    """MessageTarget.importedCap: a capability the receiver exported earlier."""

    cap_id: int


@dataclass(frozen=True)
class PromisedAnswer:
    """MessageTarget.promisedAnswer: the (future) result of question `question_id`; `transform` lists
    getPointerField indices (noop ops dropped)."""

    question_id: int
    transform: tuple[int, ...] = ()


Target = ImportedCap | PromisedAnswer


@dataclass(frozen=True)
class CapDescriptor:
    """One entry of a Payload's capTable. `id` is the export/import id for the hosted/promise kinds."""

    kind: str
    id: int = 0
    attached_fd: int = 0xFF


@dataclass(frozen=True)
class RpcException:
    """rpc.capnp Exception."""

    reason: str
    type: ExceptionType = ExceptionType.FAILED


@dataclass(frozen=True)
class Payload:
    """A Payload: the content pointer lives in `holder` pointer 0; `cap_table` its descriptors."""

    holder: StructReader = field(compare=False, repr=False)
    cap_table: tuple[CapDescriptor, ...] = ()

    def content_kind(self) -> str:
        return self.holder.pointer_kind(0, "Payload.content")

    def struct(self, what: str) -> StructReader:
        return self.holder.struct(0, what)

    def capability(self) -> int | None:
        return self.holder.capability(0, "Payload.content")


@dataclass(frozen=True)
class BootstrapMessage:
    question_id: int


@dataclass(frozen=True)
class CallMessage:
    question_id: int
    target: Target
    interface_id: int
    method_id: int
    send_results_to: int  # 0 caller, 1 yourself, 2 thirdParty
    params: Payload
    allow_third_party_tail_call: bool = False
    no_promise_pipelining: bool = False
    only_promise_pipeline: bool = False


@dataclass(frozen=True)
class ReturnMessage:
    answer_id: int
    release_param_caps: bool
    no_finish_needed: bool
    kind: str  # one of _RETURN_KINDS, or "unknown(N)"
    results: Payload | None = None
    exception: RpcException | None = None
    take_from_other_question: int = 0


@dataclass(frozen=True)
class FinishMessage:
    question_id: int
    release_result_caps: bool = True
    require_early_cancellation_workaround: bool = True


@dataclass(frozen=True)
class ReleaseMessage:
    id: int
    reference_count: int


@dataclass(frozen=True)
class AbortMessage:
    exception: RpcException


@dataclass(frozen=True)
class UnimplementedMessage:
    """The peer echoes a message of ours it did not understand."""

    echoed: RpcMessage | None


@dataclass(frozen=True)
class OtherMessage:
    """Any message this subset does not handle (resolve, disembargo, provide, ...)."""

    tag: int
    root: StructReader = field(compare=False, repr=False)


RpcMessage = (BootstrapMessage | CallMessage | ReturnMessage | FinishMessage | ReleaseMessage | AbortMessage
              | UnimplementedMessage | OtherMessage)


def _read_exception(r: StructReader, what: str) -> RpcException:
    raw_type = r.u16(4)
    try:
        etype = ExceptionType(raw_type)
    except ValueError:
        etype = ExceptionType.FAILED
    return RpcException(reason=r.text(0, f"{what}.reason"), type=etype)


def _read_payload(r: StructReader, what: str) -> Payload:
    caps = []
    for d in r.struct_list(1, f"{what}.capTable"):
        tag = d.u16(0)
        kind = _CAP_KINDS[tag] if tag < len(_CAP_KINDS) else f"unknown({tag})"
        cap_id = d.u32(4) if kind in ("senderHosted", "senderPromise", "receiverHosted") else 0
        caps.append(CapDescriptor(kind=kind, id=cap_id, attached_fd=d.u8(2) ^ 0xFF))
    return Payload(holder=r, cap_table=tuple(caps))


def _read_target(r: StructReader, what: str) -> Target:
    tag = r.u16(4)
    if tag == 0:
        return ImportedCap(r.u32(0))
    if tag == 1:
        pa = r.struct(0, f"{what}.promisedAnswer")
        ops = []
        for i, op in enumerate(pa.struct_list(0, f"{what}.promisedAnswer.transform")):
            op_tag = op.u16(0)
            if op_tag == 1:
                ops.append(op.u16(2))
            elif op_tag != 0:
                raise CapnpError(f"{what}.promisedAnswer.transform[{i}]: unknown op {op_tag}")
        return PromisedAnswer(pa.u32(0), tuple(ops))
    raise CapnpError(f"{what}: unknown MessageTarget union tag {tag}")


def parse_rpc_message(root: StructReader, *, _nested: bool = False) -> RpcMessage:
    """Decode an rpc.capnp Message struct."""
    tag = root.u16(0)
    if tag == TAG_BOOTSTRAP:
        return BootstrapMessage(root.struct(0, "Message.bootstrap").u32(0))
    if tag == TAG_CALL:
        c = root.struct(0, "Message.call")
        return CallMessage(
            question_id=c.u32(0), method_id=c.u16(4), send_results_to=c.u16(6), interface_id=c.u64(8),
            target=_read_target(c.struct(0, "Call.target"), "Call.target"),
            params=_read_payload(c.struct(1, "Call.params"), "Call.params"),
            allow_third_party_tail_call=c.flag(128), no_promise_pipelining=c.flag(129),
            only_promise_pipeline=c.flag(130))
    if tag == TAG_RETURN:
        r = root.struct(0, "Message.return")
        which = r.u16(6)
        kind = _RETURN_KINDS[which] if which < len(_RETURN_KINDS) else f"unknown({which})"
        return ReturnMessage(
            answer_id=r.u32(0), release_param_caps=r.flag(32, default=True), no_finish_needed=r.flag(33),
            kind=kind,
            results=_read_payload(r.struct(0, "Return.results"), "Return.results") if which == 0 else None,
            exception=_read_exception(r.struct(0, "Return.exception"), "Return.exception")
            if which == 1 else None,
            take_from_other_question=r.u32(8) if which == 4 else 0)
    if tag == TAG_FINISH:
        f = root.struct(0, "Message.finish")
        return FinishMessage(f.u32(0), f.flag(32, default=True), f.flag(33, default=True))
    if tag == TAG_RELEASE:
        rel = root.struct(0, "Message.release")
        return ReleaseMessage(rel.u32(0), rel.u32(4))
    if tag == TAG_ABORT:
        return AbortMessage(_read_exception(root.struct(0, "Message.abort"), "Message.abort"))
    if tag == TAG_UNIMPLEMENTED and not _nested:
        inner = root.struct_or_none(0, "Message.unimplemented")
        return UnimplementedMessage(parse_rpc_message(inner, _nested=True) if inner is not None else None)
    return OtherMessage(tag, root)


def decode_rpc_message(segments: list[bytes]) -> RpcMessage:
    """Decode one de-framed message."""
    return parse_rpc_message(Message(segments).root())


# --------------------------------------------------------------------------------------------------
# Encoders (each returns one framed message)

ContentWriter = Callable[[StructBuilder, int], None]


def _new_message(tag: int) -> tuple[MessageBuilder, StructBuilder]:
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, tag)
    return msg, root


def encode_bootstrap(question_id: int) -> bytes:
    msg, root = _new_message(TAG_BOOTSTRAP)
    root.init_struct(0, 1, 1).set_u32(0, question_id)
    return msg.to_bytes()


def _write_payload(payload: StructBuilder, content: ContentWriter | None,
                   cap_table: tuple[CapDescriptor, ...] = ()) -> None:
    if content is None:
        payload.init_struct(0, 0, 0)
    else:
        content(payload, 0)
    for d, c in zip(payload.init_struct_list(1, len(cap_table), 1, 1), cap_table, strict=True):
        d.set_u16(0, _CAP_KINDS.index(c.kind))
        d.set_u32(4, c.id)
        d.set_u8(2, c.attached_fd ^ 0xFF)


def encode_call(question_id: int, target: Target, interface_id: int, method_id: int,
                params: ContentWriter | None) -> bytes:
    """A Call with sendResultsTo caller and an empty capTable; `params` writes the params struct
    (None: an empty struct)."""
    msg, root = _new_message(TAG_CALL)
    c = root.init_struct(0, 3, 3)
    c.set_u32(0, question_id)
    c.set_u16(4, method_id)
    c.set_u64(8, interface_id)
    t = c.init_struct(0, 1, 1)
    if isinstance(target, ImportedCap):
        t.set_u32(0, target.cap_id)
    else:
        t.set_u16(4, 1)
        pa = t.init_struct(0, 1, 1)
        pa.set_u32(0, target.question_id)
        for op, index in zip(pa.init_struct_list(0, len(target.transform), 1, 0), target.transform,
                             strict=True):
            op.set_u16(0, 1)
            op.set_u16(2, index)
    _write_payload(c.init_struct(1, 0, 2), params)
    return msg.to_bytes()


def _init_return(answer_id: int, which: int,
                 release_param_caps: bool) -> tuple[MessageBuilder, StructBuilder]:
    msg, root = _new_message(TAG_RETURN)
    r = root.init_struct(0, 2, 1)
    r.set_u32(0, answer_id)
    r.set_bool(32, release_param_caps, default=True)
    r.set_u16(6, which)
    return msg, r


def encode_return_results(answer_id: int, content: ContentWriter | None,
                          cap_table: tuple[CapDescriptor, ...] = (), *,
                          release_param_caps: bool = False) -> bytes:
    """A Return with results; `content` writes the results struct (None: an empty struct)."""
    msg, r = _init_return(answer_id, 0, release_param_caps)
    _write_payload(r.init_struct(0, 0, 2), content, cap_table)
    return msg.to_bytes()


def encode_bootstrap_return(answer_id: int, export_id: int = BOOTSTRAP_EXPORT_ID) -> bytes:
    """The answer to Bootstrap: content = capability #0, capTable = [senderHosted(export_id)]."""
    return encode_return_results(answer_id, lambda p, i: p.set_capability(i, 0),
                                 (CapDescriptor("senderHosted", export_id),))


def encode_return_exception(answer_id: int, reason: str, type: ExceptionType = ExceptionType.FAILED, *,
                            release_param_caps: bool = False) -> bytes:
    msg, r = _init_return(answer_id, 1, release_param_caps)
    _write_exception(r.init_struct(0, 1, 1), reason, type)
    return msg.to_bytes()


def _write_exception(e: StructBuilder, reason: str, type: ExceptionType) -> None:
    e.set_text(0, reason)
    e.set_u16(4, int(type))


def encode_finish(question_id: int, release_result_caps: bool = False) -> bytes:
    msg, root = _new_message(TAG_FINISH)
    f = root.init_struct(0, 1, 0)
    f.set_u32(0, question_id)
    f.set_bool(32, release_result_caps, default=True)
    return msg.to_bytes()


def encode_release(cap_id: int, reference_count: int) -> bytes:
    msg, root = _new_message(TAG_RELEASE)
    r = root.init_struct(0, 1, 0)
    r.set_u32(0, cap_id)
    r.set_u32(4, reference_count)
    return msg.to_bytes()


def encode_abort(reason: str, type: ExceptionType = ExceptionType.FAILED) -> bytes:
    msg, root = _new_message(TAG_ABORT)
    _write_exception(root.init_struct(0, 1, 1), reason, type)
    return msg.to_bytes()


def encode_unimplemented(original: StructReader) -> bytes:
    """Echo a received Message (its root struct) back as `unimplemented`."""
    msg, root = _new_message(TAG_UNIMPLEMENTED)
    root.copy_struct(0, original, "Message")
    return msg.to_bytes()


# --------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class RegisterConnectionCalled:
    """Server: the connector called registerConnection; answer with `answer_registration`."""

    question_id: int
    params: RegisterConnectionParams


@dataclass(frozen=True)
class UpdateLocalConfigurationCalled:
    """Server: the connector sent its local configuration (JSON bytes); answer with `answer_empty`."""

    question_id: int
    config: bytes


@dataclass(frozen=True)
class UnregisterConnectionCalled:
    """Server: the connector is shutting down gracefully; answer with `answer_empty`."""

    question_id: int


@dataclass(frozen=True)
class RpcAborted:
    """Either side: the peer sent Abort; the RPC conversation is over (not an error)."""

    reason: str


@dataclass(frozen=True)
class RegistrationAnswered:
    """Client: registerConnection came back with details (registered) or a RegistrationError."""

    question_id: int
    result: RegistrationResult


@dataclass(frozen=True)
class CallReturned:
    """Client: updateLocalConfiguration / unregisterConnection returned (empty results)."""

    question_id: int
    method: str


@dataclass(frozen=True)
class CallFailed:
    """Client: a call (or the bootstrap, method "bootstrap") failed: Return.exception, a canceled or
    malformed answer. `reason` is the peer's text."""

    question_id: int
    method: str
    reason: str


ServerEvent = (RegisterConnectionCalled | UpdateLocalConfigurationCalled | UnregisterConnectionCalled
               | RpcAborted)
ClientEvent = RegistrationAnswered | CallReturned | CallFailed | RpcAborted


# --------------------------------------------------------------------------------------------------
# Shared plumbing


class _Conversation:
    def __init__(self, max_message_bytes: int) -> None:
        self._reader = MessageReader(max_message_bytes=max_message_bytes)
        self._out = bytearray()
        self._aborted = False

    @property
    def aborted(self) -> bool:
        """True after either side sent Abort; later input is ignored."""
        return self._aborted

    def data_to_send(self) -> bytes:
        """Bytes to write to the control stream (framed RPC messages), then forgotten."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _messages(self, data: bytes) -> Iterator[tuple[RpcMessage, StructReader]]:
        """Each complete message now available, parsed one at a time so that the caller handles it
        before the next is read; stops after Abort (what follows it is never read)."""
        if self._aborted:
            return
        self._reader.feed(data)
        while not self._aborted and (segments := self._reader.next_message()) is not None:
            root = Message(segments).root()
            yield parse_rpc_message(root), root


# --------------------------------------------------------------------------------------------------
# Edge side


@dataclass
class _Answer:
    kind: str  # "bootstrap" or a method name
    returned: bool = False


class RpcServer(_Conversation):
    """The edge's side: answers Bootstrap with its RegistrationServer (export 0) and turns calls into events.

    Calls may target the bootstrap question's promised answer or the imported capability. Question ids
    may be reused once Finished. Finish and Release only update bookkeeping. Unknown interfaces or
    methods are answered with an `unimplemented` exception; messages outside this subset are echoed
    back as `unimplemented`.
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_message_bytes)
        self._answers: dict[int, _Answer] = {}
        self._export_refs = 0

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        """Feed bytes from the control stream; returns the events they complete."""
        events: list[ServerEvent] = []
        for message, root in self._messages(data):
            event = self._handle(message, root)
            if event is not None:
                events.append(event)
        return events

    def _handle(self, message: RpcMessage, root: StructReader) -> ServerEvent | None:
        if isinstance(message, BootstrapMessage):
            self._claim(message.question_id, "Bootstrap")
            self._answers[message.question_id] = _Answer("bootstrap", returned=True)
            self._export_refs += 1
            self._out += encode_bootstrap_return(message.question_id)
            return None
        if isinstance(message, CallMessage):
            return self._handle_call(message)
        if isinstance(message, FinishMessage):
            answer = self._answers.pop(message.question_id, None)
            if answer is not None and answer.kind == "bootstrap" and message.release_result_caps:
                self._export_refs = max(0, self._export_refs - 1)
            return None
        if isinstance(message, ReleaseMessage):
            if message.id == BOOTSTRAP_EXPORT_ID:
                self._export_refs = max(0, self._export_refs - message.reference_count)
            return None
        if isinstance(message, AbortMessage):
            self._aborted = True
            return RpcAborted(message.exception.reason)
        if isinstance(message, ReturnMessage):
            raise RpcError(f"rpc: Return for question {message.answer_id}, but the edge asks no questions")
        if isinstance(message, UnimplementedMessage):
            return None  # the connector did not understand something of ours; nothing depends on it
        self._out += encode_unimplemented(root)
        return None

    def _claim(self, question_id: int, what: str) -> None:
        if question_id in self._answers:
            raise RpcError(f"rpc: {what} reuses question {question_id} before it was finished")

    def _admit(self, call: CallMessage, method: str, *, implemented: bool) -> bool:
        """Take a Call's question; answer it at once with an exception, and return False, when it targets an
        unknown capability, wants its results sent elsewhere, or names a method not `implemented`."""
        q = call.question_id
        self._claim(q, "Call")
        self._answers[q] = _Answer(method)
        problem = self._check_target(call.target)
        if problem is not None:
            self._fail(q, problem)
        elif call.send_results_to != 0:
            self._fail(q, "rpc: only sendResultsTo.caller is supported", ExceptionType.UNIMPLEMENTED)
        elif not implemented:
            self._fail(q, f"rpc: unimplemented: {method}", ExceptionType.UNIMPLEMENTED)
        else:
            return True
        return False

    def _handle_call(self, call: CallMessage) -> ServerEvent | None:
        q = call.question_id
        ours = call.interface_id == REGISTRATION_SERVER_ID
        method = METHOD_NAMES.get(call.method_id, f"method {call.method_id}") if ours else \
            f"interface 0x{call.interface_id:016x} method {call.method_id}"
        if not self._admit(call, method, implemented=ours and call.method_id in METHOD_NAMES):
            return None
        try:
            if call.method_id == METHOD_REGISTER_CONNECTION:
                params = read_register_params(call.params.struct("registerConnection.params"))
                return RegisterConnectionCalled(q, params)
            if call.method_id == METHOD_UPDATE_LOCAL_CONFIGURATION:
                what = "updateLocalConfiguration.params"
                config = read_update_configuration_params(call.params.struct(what), what)
                return UpdateLocalConfigurationCalled(q, config)
        except CapnpError as exc:
            self._fail(q, f"rpc: bad {method} params: {exc}")
            return None
        assert call.method_id == METHOD_UNREGISTER_CONNECTION
        return UnregisterConnectionCalled(q)

    def _check_target(self, target: Target) -> str | None:
        if isinstance(target, ImportedCap):
            if target.cap_id != BOOTSTRAP_EXPORT_ID or self._export_refs <= 0:
                return f"rpc: call on unknown capability {target.cap_id}"
            return None
        answer = self._answers.get(target.question_id)
        if answer is None or answer.kind != "bootstrap":
            return f"rpc: call on promised answer of unknown question {target.question_id}"
        if target.transform:
            return "rpc: the bootstrap answer has no pointer fields to transform"
        return None

    def _fail(self, question_id: int, reason: str, type: ExceptionType = ExceptionType.FAILED) -> None:
        self._answers[question_id].returned = True
        self._out += encode_return_exception(question_id, reason, type)

    def _take(self, question_id: int, methods: tuple[str, ...]) -> bool:
        answer = self._answers.get(question_id)
        if answer is None or answer.returned or answer.kind not in methods or self._aborted:
            return False  # finished (canceled) meanwhile, or never asked: nothing to answer
        answer.returned = True
        return True

    def answer_registration(self, question_id: int, result: ConnectionDetails | RegistrationError) -> None:
        """Answer registerConnection with connection details or a refusal (ignored if it was canceled)."""
        if not isinstance(result, ConnectionDetails | RegistrationError):
            raise TypeError("result must be ConnectionDetails or RegistrationError")
        if self._take(question_id, ("registerConnection",)):
            self._out += encode_return_results(question_id, lambda p, i: write_register_results(p, i, result))

    def answer_empty(self, question_id: int) -> None:
        """Answer updateLocalConfiguration / unregisterConnection with empty results."""
        if self._take(question_id, ("updateLocalConfiguration", "unregisterConnection")):
            self._out += encode_return_results(question_id, None)

    def answer_exception(self, question_id: int, reason: str) -> None:
        """Fail a pending call with Return.exception (type failed)."""
        if self._take(question_id, tuple(METHOD_NAMES.values())):
            self._out += encode_return_exception(question_id, reason)


# --------------------------------------------------------------------------------------------------
# Connector side


@dataclass
class _Question:
    method: str  # "bootstrap" or a RegistrationServer method name
    canceled: bool = False


class RpcClient(_Conversation):
    """The connector's side: bootstraps the edge's RegistrationServer and calls it.

    Question ids are allocated like Go's library: a freed id is reused last-in first-out, so after
    Finish q0, Finish q1 the next call is q1 again (as captured). Every Return is Finished with
    releaseResultCaps false.
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_message_bytes)
        self._questions: dict[int, _Question] = {}
        self._free: list[int] = []
        self._next_id = 0
        self._bootstrap_question: int | None = None
        self._cap: int | None = None
        self._answers: set[int] = set()  # questions the edge asked us (always refused)

    def _new_question(self, method: str) -> int:
        if self._aborted:
            raise RpcError("rpc: the RPC connection was aborted")
        q = self._free.pop() if self._free else self._next_id
        if q == self._next_id:
            self._next_id += 1
        self._questions[q] = _Question(method)
        return q

    def _target(self) -> Target:
        if self._cap is not None:
            return ImportedCap(self._cap)
        if self._bootstrap_question is None:
            self._bootstrap_question = self._new_question("bootstrap")
            self._out += encode_bootstrap(self._bootstrap_question)
        return PromisedAnswer(self._bootstrap_question)

    def _call(self, method_id: int, params: ContentWriter | None) -> int:
        target = self._target()
        q = self._new_question(METHOD_NAMES[method_id])
        self._out += encode_call(q, target, REGISTRATION_SERVER_ID, method_id, params)
        return q

    def register_connection(self, params: RegisterConnectionParams) -> int:
        """Queue Bootstrap (first time) and the pipelined registerConnection call; returns its question id."""
        return self._call(METHOD_REGISTER_CONNECTION, lambda p, i: write_register_params(p, i, params))

    def update_local_configuration(self, config: bytes) -> int:
        """Queue updateLocalConfiguration(config JSON bytes); returns its question id."""
        return self._call(METHOD_UPDATE_LOCAL_CONFIGURATION,
                          lambda p, i: write_update_configuration_params(p, i, config))

    def unregister_connection(self) -> int:
        """Queue unregisterConnection(); returns its question id."""
        return self._call(METHOD_UNREGISTER_CONNECTION, None)

    def cancel(self, question_id: int) -> None:
        """Give up on a call (e.g. after the RPC timeout): Finish with releaseResultCaps true, as Go does.
        The id is reused only after the edge's Return for it arrives (which is then ignored)."""
        question = self._questions.get(question_id)
        if question is None or question.canceled or self._aborted:
            return
        question.canceled = True
        self._out += encode_finish(question_id, release_result_caps=True)

    def abort(self, reason: str = "rpc: shutdown") -> None:
        """End the conversation: Release the imported capability (if any), then Abort."""
        if self._aborted:
            return
        if self._cap is not None:
            self._out += encode_release(self._cap, 1)
            self._cap = None
        self._out += encode_abort(reason)
        self._aborted = True

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """Feed bytes from the control stream; returns the events they complete."""
        events: list[ClientEvent] = []
        for message, root in self._messages(data):
            event = self._handle(message, root)
            if event is not None:
                events.append(event)
        return events

    def _free_id(self, q: int) -> None:
        """Forget an answered (or echoed) question: its id is reused next; a bootstrap is asked again."""
        if self._questions.pop(q).method == "bootstrap":
            self._bootstrap_question = None
        self._free.append(q)

    def _handle(self, message: RpcMessage, root: StructReader) -> ClientEvent | None:
        if isinstance(message, ReturnMessage):
            return self._handle_return(message)
        if isinstance(message, AbortMessage):
            self._aborted = True
            return RpcAborted(message.exception.reason)
        if isinstance(message, BootstrapMessage | CallMessage):
            q = message.question_id
            if q in self._answers:
                raise RpcError(f"rpc: question {q} from the edge reused before it was finished")
            self._answers.add(q)
            reason = "rpc: no bootstrap interface" if isinstance(message, BootstrapMessage) \
                else "rpc: call on a capability the connector never exported"
            self._out += encode_return_exception(q, reason)
            return None
        if isinstance(message, FinishMessage):
            self._answers.discard(message.question_id)
            return None
        if isinstance(message, ReleaseMessage):
            return None
        if isinstance(message, UnimplementedMessage):
            echoed = message.echoed
            if isinstance(echoed, BootstrapMessage | CallMessage):
                q = echoed.question_id
                question = self._questions.get(q)
                if question is not None:
                    self._free_id(q)
                    if not question.canceled:
                        return CallFailed(q, question.method, "rpc: the edge does not implement this call")
            return None
        self._out += encode_unimplemented(root)
        return None

    def _handle_return(self, ret: ReturnMessage) -> ClientEvent | None:
        q = ret.answer_id
        question = self._questions.get(q)
        if question is None:
            raise RpcError(f"rpc: Return for question {q}, which is not outstanding")
        if not question.canceled and not ret.no_finish_needed:
            self._out += encode_finish(q, release_result_caps=False)
        self._free_id(q)
        if question.canceled:
            return None
        if ret.kind == "exception":
            assert ret.exception is not None
            return CallFailed(q, question.method, ret.exception.reason)
        if ret.kind != "results" or ret.results is None:
            return CallFailed(q, question.method, f"rpc: unexpected Return kind {ret.kind}")
        try:
            if question.method == "bootstrap":
                return self._bootstrapped(q, ret.results)
            if question.method == "registerConnection":
                result = read_register_results(ret.results.struct("registerConnection.results"))
                return RegistrationAnswered(q, result)
        except CapnpError as exc:
            return CallFailed(q, question.method, f"rpc: malformed answer: {exc}")
        return CallReturned(q, question.method)

    def _bootstrapped(self, q: int, results: Payload) -> ClientEvent | None:
        index = results.capability()
        if index is None or index >= len(results.cap_table):
            return CallFailed(q, "bootstrap", "rpc: the bootstrap answer holds no capability")
        descriptor = results.cap_table[index]
        if descriptor.kind not in ("senderHosted", "senderPromise"):
            return CallFailed(q, "bootstrap", f"rpc: bootstrap capability of kind {descriptor.kind}")
        self._cap = descriptor.id
        return None
