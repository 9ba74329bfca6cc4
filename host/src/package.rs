//! Deployment packages: the zip that `CreateFunction` takes.

use std::io::{Cursor, Write};

/// The component's path inside a package, and the default Handler of
/// `wasip2`.
pub const COMPONENT_IN_ZIP: &str = "function.wasm";

/// The executable of a custom runtime inside a package.
pub const BOOTSTRAP_IN_ZIP: &str = "bootstrap";

/// A deterministic zip of one file: the same bytes always give the same
/// zip, hence the same CodeSha256.
fn pack_one(name: &str, mode: u32, bytes: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default())
        .unix_permissions(mode);
    w.start_file(name, options)?;
    w.write_all(bytes)?;
    Ok(w.finish()?.into_inner())
}

/// A package holding `component` as `function.wasm`.
pub fn pack_component(component: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    pack_one(COMPONENT_IN_ZIP, 0o644, component)
}

/// A package holding an executable `bootstrap`.
pub fn pack_bootstrap(executable: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    pack_one(BOOTSTRAP_IN_ZIP, 0o755, executable)
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
        let b = pack_bootstrap(b"\x7fELF").unwrap();
        let mut archive = zip::ZipArchive::new(Cursor::new(b)).unwrap();
        let entry = archive.by_index(0).unwrap();
        assert_eq!(entry.name(), BOOTSTRAP_IN_ZIP);
        assert_eq!(entry.unix_mode().unwrap() & 0o777, 0o755);
    }
}
