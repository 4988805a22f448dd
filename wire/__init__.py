"""The sans-I/O protocol core shared by the edge and the connector.

Nothing in this package does I/O, logs, or imports trio: it turns bytes and small values into
events and bytes, so that hypothesis can test every decision that reaches the wire.
"""
