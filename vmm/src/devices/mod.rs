//! Deterministic device models. They do no I/O: values from the outside world are passed in by the caller, which takes them from the timeline.
