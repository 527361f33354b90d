"""Rendezvous: agents behind NAT meet through an authenticated relay (see docs/rendezvous.md)."""
