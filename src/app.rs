//! Wires modules together.
