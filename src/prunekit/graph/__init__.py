"""Model -> Graph -> Groups. See docs/tracing.md for the tracing technique."""
from .groups import Graph, Group, GroupMember, build_graph
from .rules import RULES, opaque, passthrough, register_rule

__all__ = ["Graph", "Group", "GroupMember", "build_graph", "RULES", "register_rule", "passthrough", "opaque"]
