"""wire.rpc details pinned by mutation testing (docs/mutation-report.md): every capTable kind and field,
the Call flags and target forms, Return's exception struct, and the labels errors carry."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest

from tests.unit.test_capnp_codec import far_ptr, list_ptr, struct_ptr, words
from tunnel_lab.wire.capnp import Message, MessageBuilder, StructReader, unframe
from tunnel_lab.wire.errors import CapnpError
from tunnel_lab.wire.rpc import (
    TAG_BOOTSTRAP,
    TAG_CALL,
    TAG_RETURN,
    TAG_UNIMPLEMENTED,
    BootstrapMessage,
    CallMessage,
    CapDescriptor,
    ExceptionType,
    FinishMessage,
    ImportedCap,
    OtherMessage,
    PromisedAnswer,
    ReturnMessage,
    UnimplementedMessage,
    decode_rpc_message,
    encode_abort,
    encode_bootstrap,
    encode_call,
    encode_finish,
    encode_release,
    encode_return_exception,
    encode_return_results,
    encode_unimplemented,
)

KINDS = ("none", "senderHosted", "senderPromise", "receiverHosted", "receiverAnswer", "thirdPartyHosted")


def decode(framed: bytes):  # type: ignore[no-untyped-def]
    return decode_rpc_message(unframe(framed))


def test_cap_table_round_trips_every_kind_id_and_fd() -> None:
    table = tuple(CapDescriptor(kind, id=7 + i if kind in ("senderHosted", "senderPromise", "receiverHosted")
                                else 0, attached_fd=i) for i, kind in enumerate(KINDS))
    ret = decode(encode_return_results(3, None, table))
    assert isinstance(ret, ReturnMessage) and ret.results is not None
    assert ret.results.cap_table == table


def test_cap_table_ids_only_for_the_kinds_that_have_one_and_unknown_kinds_named() -> None:
    # receiverAnswer / thirdPartyHosted keep a pointer, not an id: whatever is in the id's bytes is not one
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, 3)  # Return
    r = root.init_struct(0, 2, 1)
    payload = r.init_struct(0, 0, 2)
    payload.init_struct(0, 0, 0)
    entries = payload.init_struct_list(1, 3, 1, 1)
    for entry, tag in zip(entries, (4, 5, 6), strict=True):
        entry.set_u16(0, tag)
        entry.set_u32(4, 99)
        entry.set_u8(2, 0xFF)  # attached_fd stored XOR 0xFF: 0
    ret = decode_rpc_message(msg.segments())
    assert isinstance(ret, ReturnMessage) and ret.results is not None
    assert ret.results.cap_table == (CapDescriptor("receiverAnswer", 0, 0),
                                     CapDescriptor("thirdPartyHosted", 0, 0),
                                     CapDescriptor("unknown(6)", 0, 0))


def test_call_target_forms_and_flags() -> None:
    call = decode(encode_call(5, PromisedAnswer(2, (0, 3)), 0xABCDEF, 1, None))
    assert isinstance(call, CallMessage)
    assert (call.question_id, call.method_id, call.interface_id) == (5, 1, 0xABCDEF)
    assert call.target == PromisedAnswer(2, (0, 3))
    assert not (call.allow_third_party_tail_call or call.no_promise_pipelining or call.only_promise_pipeline)
    assert decode(encode_call(6, ImportedCap(4), 1, 2, None)).target == ImportedCap(4)  # type: ignore[union-attr]
    segments = unframe(encode_call(5, ImportedCap(0), 1, 2, None))
    # set the three flag bits (bits 128..130 of the Call struct's data section)
    call_struct = Message(segments).root().struct(0, "call")
    data = bytearray(segments[0])
    data[call_struct._data * 8 + 16] |= 0b111
    flagged = decode_rpc_message([bytes(data)])
    assert isinstance(flagged, CallMessage)
    assert flagged.allow_third_party_tail_call and flagged.no_promise_pipelining
    assert flagged.only_promise_pipeline


def test_return_exception_struct_and_flags() -> None:
    ret = decode(encode_return_exception(9, "boom", ExceptionType.DISCONNECTED, release_param_caps=True))
    assert isinstance(ret, ReturnMessage) and ret.exception is not None
    assert (ret.answer_id, ret.kind, ret.exception.reason, ret.exception.type) == (
        9, "exception", "boom", ExceptionType.DISCONNECTED)
    assert ret.release_param_caps
    plain = decode(encode_return_exception(9, "boom"))
    assert isinstance(plain, ReturnMessage) and not plain.release_param_caps
    assert not decode(encode_return_results(1, None)).release_param_caps  # type: ignore[union-attr]
    # the Exception struct is one data word and one pointer, as rpc.capnp lays it out
    exc = Message(unframe(encode_return_exception(9, "boom"))).root().struct(0, "r").struct(0, "e")
    assert (exc.data_words, exc.pointer_count) == (1, 1)


def test_unknown_exception_type_reads_as_failed() -> None:
    segments = unframe(encode_return_exception(1, "x", ExceptionType.OVERLOADED))
    exc = Message(segments).root().struct(0, "r").struct(0, "e")
    data = bytearray(segments[0])
    data[exc._data * 8 + 4] = 77  # type field: no such ExceptionType
    ret = decode_rpc_message([bytes(data)])
    assert isinstance(ret, ReturnMessage) and ret.exception is not None
    assert ret.exception.type is ExceptionType.FAILED and ret.exception.reason == "x"


def _message(tag: int, *body: int) -> list[bytes]:
    """A Message struct (1 data word holding `tag`, 1 pointer) followed by `body` words."""
    return [words(struct_ptr(0, 1, 1), tag, *body)]


def test_parse_errors_carry_the_field_labels() -> None:
    with pytest.raises(CapnpError, match=r"^capnp pointer Message\.bootstrap: points outside"):
        decode_rpc_message(_message(TAG_BOOTSTRAP, struct_ptr(5, 1, 0)))
    with pytest.raises(CapnpError, match=r"^capnp pointer Message\.call: points outside"):
        decode_rpc_message(_message(TAG_CALL, struct_ptr(5, 3, 3)))
    # Call whose target struct is out of range, then whose target reason has an unknown union tag
    call_bad_target = _message(TAG_CALL, struct_ptr(0, 3, 3), 0, 0, 0, struct_ptr(9, 1, 1), 0, 0)
    with pytest.raises(CapnpError, match=r"^capnp pointer Call\.target: points outside"):
        decode_rpc_message(call_bad_target)
    call_bad_union = _message(TAG_CALL, struct_ptr(0, 3, 3), 0, 0, 0, struct_ptr(2, 1, 1), 0, 0,
                              7 << 32, 0)
    with pytest.raises(CapnpError, match=r"^Call\.target: unknown MessageTarget union tag 7$"):
        decode_rpc_message(call_bad_union)
    # promisedAnswer with a transform op of tag 2
    promised = _message(TAG_CALL, struct_ptr(0, 3, 3), 0, 0, 0, struct_ptr(2, 1, 1), 0, 0,
                        1 << 32, struct_ptr(0, 1, 1), 0, list_ptr(0, 7, 1), struct_ptr(1, 1, 0), 2)
    with pytest.raises(CapnpError, match=r"^Call\.target\.promisedAnswer\.transform\[0\]: unknown op 2$"):
        decode_rpc_message(promised)


# --- every pointer a decoder reads is named in its error --------------------------------------------


def _break(framed: bytes, path: Callable[[StructReader], tuple[StructReader, int]]) -> list[bytes]:
    """The message with one pointer (pointer `index` of the struct `path` reaches) made a far pointer
    to a segment the message does not have."""
    segments = unframe(framed)
    holder, index = path(Message(segments).root())
    data = bytearray(segments[0])
    struct.pack_into("<Q", data, (holder._ptrs + index) * 8, far_ptr(9, 0))
    return [bytes(data)]


def _call(root: StructReader) -> StructReader:
    return root.struct(0, "call")


def _ret(root: StructReader) -> StructReader:
    return root.struct(0, "return")


_PIPELINED = encode_call(1, PromisedAnswer(0, (2,)), 1, 0, None)
_RESULTS = encode_return_results(1, None, (CapDescriptor("senderHosted", 0),))
_EXCEPTION = encode_return_exception(1, "boom")
_ABORT = encode_abort("bye")


@pytest.mark.parametrize(("framed", "path", "label"), [
    (encode_bootstrap(1), lambda r: (r, 0), "Message.bootstrap"),
    (_PIPELINED, lambda r: (r, 0), "Message.call"),
    (_PIPELINED, lambda r: (_call(r), 0), "Call.target"),
    (_PIPELINED, lambda r: (_call(r), 1), "Call.params"),
    (_PIPELINED, lambda r: (_call(r).struct(1, "p"), 1), "Call.params.capTable"),
    (_PIPELINED, lambda r: (_call(r).struct(0, "t"), 0), "Call.target.promisedAnswer"),
    (_PIPELINED, lambda r: (_call(r).struct(0, "t").struct(0, "pa"), 0),
     "Call.target.promisedAnswer.transform"),
    (_RESULTS, lambda r: (r, 0), "Message.return"),
    (_RESULTS, lambda r: (_ret(r), 0), "Return.results"),
    (_RESULTS, lambda r: (_ret(r).struct(0, "p"), 1), "Return.results.capTable"),
    (_EXCEPTION, lambda r: (_ret(r), 0), "Return.exception"),
    (_EXCEPTION, lambda r: (_ret(r).struct(0, "e"), 0), "Return.exception.reason"),
    (encode_finish(1), lambda r: (r, 0), "Message.finish"),
    (encode_release(1, 1), lambda r: (r, 0), "Message.release"),
    (_ABORT, lambda r: (r, 0), "Message.abort"),
    (_ABORT, lambda r: (r.struct(0, "a"), 0), "Message.abort.reason"),
    (encode_unimplemented(Message(unframe(encode_finish(1))).root()), lambda r: (r, 0),
     "Message.unimplemented"),
])
def test_decode_errors_name_the_pointer(framed: bytes,
                                        path: Callable[[StructReader], tuple[StructReader, int]],
                                        label: str) -> None:
    broken = _break(framed, path)
    with pytest.raises(CapnpError, match=rf"^capnp pointer {re.escape(label)}: far pointer to segment 9, "
                                         r"message has 1$"):
        decode_rpc_message(broken)


def test_payload_content_errors_name_the_content() -> None:
    ret = decode_rpc_message(_break(_RESULTS, lambda r: (_ret(r).struct(0, "p"), 0)))
    assert isinstance(ret, ReturnMessage) and ret.results is not None
    for read in (ret.results.capability, ret.results.content_kind):
        with pytest.raises(CapnpError, match=r"^capnp pointer Payload\.content: far pointer to segment 9"):
            read()
    with pytest.raises(CapnpError, match=r"^capnp pointer results: far pointer to segment 9"):
        ret.results.struct("results")


def test_echoing_a_message_names_its_bad_pointer() -> None:
    bad_resolve = Message(_break(encode_finish(1), lambda r: (r, 0))).root()
    with pytest.raises(CapnpError, match=r"^capnp pointer Message\.p0: far pointer to segment 9"):
        encode_unimplemented(bad_resolve)


# --- field positions, as rpc.capnp lays them out ----------------------------------------------------


def test_bootstrap_question_id_is_the_first_four_bytes() -> None:
    assert decode(encode_bootstrap(0x12345678)) == BootstrapMessage(0x12345678)


@pytest.mark.parametrize(("bit", "flags"), [(128, (True, False, False)), (129, (False, True, False)),
                                            (130, (False, False, True))])
def test_each_call_flag_has_its_own_bit(bit: int, flags: tuple[bool, bool, bool]) -> None:
    segments = unframe(encode_call(5, ImportedCap(0), 1, 2, None))
    data = bytearray(segments[0])
    data[Message(segments).root().struct(0, "call")._data * 8 + bit // 8] |= 1 << (bit % 8)
    call = decode_rpc_message([bytes(data)])
    assert isinstance(call, CallMessage)
    assert (call.allow_third_party_tail_call, call.no_promise_pipelining, call.only_promise_pipeline) == flags


def test_noop_transform_ops_are_skipped() -> None:
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, TAG_CALL)
    target = root.init_struct(0, 3, 3).init_struct(0, 1, 1)
    target.set_u16(4, 1)  # promisedAnswer
    promised = target.init_struct(0, 1, 1)
    promised.set_u32(0, 4)
    _noop, get = promised.init_struct_list(0, 2, 1, 0)  # op 0 is left a noop (tag 0)
    get.set_u16(0, 1)  # getPointerField
    get.set_u16(2, 3)
    call = decode_rpc_message(msg.segments())
    assert isinstance(call, CallMessage) and call.target == PromisedAnswer(4, (3,))


def _return(which: int, *, word1: int = 0, flags: int = 0) -> list[bytes]:
    """A Return with union tag `which`, its flag byte (bits 32..39) and its second data word."""
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, TAG_RETURN)
    r = root.init_struct(0, 2, 1)
    r.set_u32(0, 3)
    r.set_u8(4, flags)
    r.set_u16(6, which)
    r.set_u64(8, word1)
    return msg.segments()


def test_return_kinds_and_take_from_other_question() -> None:
    take = decode_rpc_message(_return(4, word1=0x0102030405))
    assert isinstance(take, ReturnMessage)
    assert (take.kind, take.take_from_other_question, take.results, take.exception) == (
        "takeFromOtherQuestion", 0x02030405, None, None)
    # the same bytes in a Return of another kind are not a question id
    canceled = decode_rpc_message(_return(2, word1=7))
    assert isinstance(canceled, ReturnMessage)
    assert (canceled.kind, canceled.take_from_other_question, canceled.results) == ("canceled", 0, None)
    results = decode_rpc_message(_return(0))
    assert isinstance(results, ReturnMessage) and results.take_from_other_question == 0
    assert [decode_rpc_message(_return(w)).kind for w in (5, 6, 7)] == [  # type: ignore[union-attr]
        "acceptFromThirdParty", "unknown(6)", "unknown(7)"]
    exception = decode(encode_return_exception(2, "x"))
    assert isinstance(exception, ReturnMessage) and exception.results is None


def test_return_flags_have_their_own_bits() -> None:
    # bit 32 releaseParamCaps (default true, stored inverted), bit 33 noFinishNeeded
    plain = decode_rpc_message(_return(0))
    assert isinstance(plain, ReturnMessage) and (plain.release_param_caps, plain.no_finish_needed) == (
        True, False)
    no_finish = decode_rpc_message(_return(0, flags=0b10))
    assert isinstance(no_finish, ReturnMessage) and no_finish.no_finish_needed
    bit34 = decode_rpc_message(_return(0, flags=0b100))
    assert isinstance(bit34, ReturnMessage) and not bit34.no_finish_needed
    released = decode(encode_return_results(1, None, release_param_caps=True))
    assert isinstance(released, ReturnMessage) and released.release_param_caps


def test_finish_flags_have_their_own_bits() -> None:
    # bit 32 releaseResultCaps, bit 33 requireEarlyCancellationWorkaround: both default true (inverted)
    assert decode(encode_finish(6)) == FinishMessage(6, False, True)
    assert decode(encode_finish(6, release_result_caps=True)) == FinishMessage(6, True, True)
    segments = unframe(encode_finish(6, release_result_caps=True))
    data = bytearray(segments[0])
    data[Message(segments).root().struct(0, "finish")._data * 8 + 4] |= 0b10
    assert decode_rpc_message([bytes(data)]) == FinishMessage(6, True, False)
    data[Message(segments).root().struct(0, "finish")._data * 8 + 4] |= 0b100  # bit 34: no field
    assert decode_rpc_message([bytes(data)]) == FinishMessage(6, True, False)


def test_an_unimplemented_echo_is_parsed_one_level_deep() -> None:
    inner = Message(unframe(encode_bootstrap(3))).root()
    once = encode_unimplemented(inner)
    assert decode(once) == UnimplementedMessage(BootstrapMessage(3))
    twice = decode(encode_unimplemented(Message(unframe(once)).root()))
    # the echo of an echo is not unwrapped again (a chain of them could nest without end)
    assert isinstance(twice, UnimplementedMessage) and isinstance(twice.echoed, OtherMessage)
    assert twice.echoed.tag == TAG_UNIMPLEMENTED
