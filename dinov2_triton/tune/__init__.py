"""The accuracy-aware serving-configuration search: the knobs it varies, how one candidate
is loaded and measured, and the search that finds the most capacity at a latency SLO."""
