"""Speculative decoding: the one step, draft trees and verification, shared by every drafter."""
