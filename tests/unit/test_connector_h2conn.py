"""connector.h2conn depends on h2's messages for a bad content-length: fail here when h2 changes them."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.exceptions
import pytest

from connector.h2conn import _BAD_CONTENT_LENGTH


@pytest.mark.parametrize("fields", [[(b"content-length", b"six")],
                                    [(b"content-length", b"6"), (b"content-length", b"7")]])
def test_h2_names_a_bad_content_length_as_we_expect(fields: list[tuple[bytes, bytes]]) -> None:
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                       normalize_outbound_headers=False)
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a"),
                            (b":path", b"/"), *fields])
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                  validate_inbound_headers=False))
    server.initiate_connection()
    with pytest.raises(h2.exceptions.ProtocolError) as caught:
        server.receive_data(client.data_to_send())
    assert str(caught.value).startswith(_BAD_CONTENT_LENGTH)
