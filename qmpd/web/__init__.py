"""The web layer (L4, beside the QMP listeners): dashboard, metrics, QMP over WebSocket."""

from qmpd.web.auth import Token, TokenError, create_token_file, load_token
from qmpd.web.server import WebServer

__all__ = ["WebServer", "Token", "TokenError", "create_token_file", "load_token"]
