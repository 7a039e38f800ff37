"""Who is calling. The user id comes from here, never from a request body."""

import grpc


class LocalIdentity:
    """The embedded default: no authentication, so every caller is the one configured local user."""

    def __init__(self, user_id: str):
        self._user_id = user_id

    def user_id(self, context: grpc.aio.ServicerContext) -> str:
        return self._user_id
