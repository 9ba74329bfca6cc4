//! Deployment packages: the zip that `CreateFunction` takes.

use std::io::{Cursor, Write};

/// The component's path inside a package, and the default Handler of
/// `wasip2`.
pub const COMPONENT_IN_ZIP: &str = "function.wasm";

/// A deterministic zip holding `component` as `function.wasm`: the same
/// component always gives the same bytes, hence the same CodeSha256.
pub fn pack_component(component: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default())
        .unix_permissions(0o644);
    w.start_file(COMPONENT_IN_ZIP, options)?;
    w.write_all(component)?;
    Ok(w.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_deterministic() {
        let a = pack_component(b"\0asm\x0d\0\x01\0").unwrap();
        let b = pack_component(b"\0asm\x0d\0\x01\0").unwrap();
        assert_eq!(a, b);
        let mut archive = zip::ZipArchive::new(Cursor::new(a)).unwrap();
        assert_eq!(archive.by_index(0).unwrap().name(), COMPONENT_IN_ZIP);
    }
}
