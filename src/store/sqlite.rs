//! SQLite backend of `Store`. (Placeholder; the store work fills it in.)
