"""The daemon's middle: the agent's lifecycle and link supervisor, the transfer
book, the session driver, the stream pipes, the inbox and the journal."""

from .agent import Agent, AgentConfig

__all__ = ["Agent", "AgentConfig"]
