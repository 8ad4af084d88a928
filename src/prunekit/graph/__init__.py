"""Model -> Graph -> Groups. See docs/tracing.md for the tracing technique."""
from .groups import Graph, Group, GroupMember, build_graph
from .rules import RULES, register_rule

__all__ = ["Graph", "Group", "GroupMember", "build_graph", "RULES", "register_rule"]
