//! Pushes the updates of Core's jobs to Core, in order, until Core acknowledges them.
