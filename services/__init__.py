"""The compliance domain: scoring, mutations that request recalculation, and the recalculation."""
