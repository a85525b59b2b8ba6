"""Node-to-node networking: frames, message schemas, the authenticated handshake."""
