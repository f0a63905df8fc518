//! Fuzz target: arbitrary UTF-8 into the X-Matrix header parser, as one
//! header value and as a list of values (one per line). The parser reads
//! network input, so any panic is a bug.

#![no_main]

use courier::xmatrix::{XMatrix, parse_authorization_headers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(header) = XMatrix::parse(input) {
        // Whatever parses must print and parse back to itself.
        let printed = header.to_header_value();
        assert_eq!(XMatrix::parse(&printed).as_ref(), Ok(&header));
    }
    let _ = parse_authorization_headers(input.lines());
});
