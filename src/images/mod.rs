//! Image catalog — to be filled in.
