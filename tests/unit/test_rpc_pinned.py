"""wire.rpc details pinned by mutation testing (docs/mutation-report.md): every capTable kind and field,
the Call flags and target forms, Return's exception struct, and the labels errors carry."""

from __future__ import annotations

import pytest

from tests.unit.test_capnp_codec import list_ptr, struct_ptr, words
from wire.capnp import Message, MessageBuilder, unframe
from wire.errors import CapnpError
from wire.rpc import (
    TAG_BOOTSTRAP,
    TAG_CALL,
    CallMessage,
    CapDescriptor,
    ExceptionType,
    ImportedCap,
    PromisedAnswer,
    ReturnMessage,
    decode_rpc_message,
    encode_call,
    encode_return_exception,
    encode_return_results,
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
