//! Device-list updates end to end between two real relays (issue 16).
