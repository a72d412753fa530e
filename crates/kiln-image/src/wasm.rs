//! Telling a core module from a component by its first eight bytes, and reading a component's
//! top-level imports and exports for the Wasm artifact config.
//!
//! The preamble is enough to choose a form's media types and platform (`wasip1` for modules,
//! `wasip2` for components), so nothing else of the binary is validated here: Wasmtime does
//! that when the module runs. The component's import and export names are what the CNCF
//! artifact config lists (`component.imports`/`exports`); they are read with wasmparser, the
//! parser Wasmtime itself uses, at the version already in the tree.

use serde::{Deserialize, Serialize};

/// The four bytes every Wasm binary (core module or component) starts with.
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// The version field of a core module: 1.
const MODULE_VERSION: [u8; 4] = [0x01, 0x00, 0x00, 0x00];
/// The version (0x0d, pre-1.0) and layer (1) fields of a component.
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];

/// What a Wasm binary is, from its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module (WASI preview 1).
    Module,
    /// A component (WASI preview 2).
    Component,
}

impl WasmKind {
    /// The OS a Wasm OCI artifact names for this kind: `wasip1` or `wasip2`.
    pub fn artifact_os(self) -> &'static str {
        match self {
            WasmKind::Module => "wasip1",
            WasmKind::Component => "wasip2",
        }
    }
}

/// Why bytes are not a Wasm binary Kiln knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotWasm {
    /// No `\0asm` magic (or fewer than four bytes).
    NoMagic,
    /// The magic, but not the four version/layer bytes after it.
    Truncated,
    /// The magic, then a version/layer field that is neither a core module's nor a component's.
    UnknownVersion([u8; 4]),
}

/// Tells a core module (`\0asm 01 00 00 00`) from a component (`\0asm 0d 00 01 00`).
pub fn detect(bytes: &[u8]) -> Result<WasmKind, NotWasm> {
    if bytes.len() < 4 || &bytes[..4] != WASM_MAGIC {
        return Err(NotWasm::NoMagic);
    }
    let Some(version) = bytes.get(4..8) else {
        return Err(NotWasm::Truncated);
    };
    let version = [version[0], version[1], version[2], version[3]];
    match version {
        MODULE_VERSION => Ok(WasmKind::Module),
        COMPONENT_VERSION => Ok(WasmKind::Component),
        v => Err(NotWasm::UnknownVersion(v)),
    }
}

/// The `component` object of a Wasm artifact config: the component's top-level import and
/// export names (e.g. `wasi:cli/environment@0.2.0`) and its target world, if known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    /// Names the component exports, in binary order.
    pub exports: Vec<String>,
    /// Names the component imports, in binary order.
    pub imports: Vec<String>,
    /// The world the component targets (`namespace:package/world@version`); not in the
    /// binary, so only set when the caller knows it.
    pub target: Option<String>,
}

/// Reads the top-level import and export names of a component (nested components' and core
/// modules' are not the component's own). Fails on a malformed binary.
pub fn component_info(bytes: &[u8]) -> Result<ComponentInfo, String> {
    use wasmparser::{Parser, Payload};
    let mut info = ComponentInfo::default();
    // Nested modules and components are parsed inline; only depth 0 is the component's own.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.map_err(|e| e.to_string())?;
                    info.imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(|e| e.to_string())?;
                    info.exports.push(export.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal core module: magic + version 1, no sections.
    pub(crate) const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";

    /// A component importing instance `wasi:cli/environment@0.2.0` (of an empty instance
    /// type) and exporting that instance again as `wasi:cli/run@0.2.0`, hand-assembled from
    /// the component binary format: type section (7), import section (10), export section (11).
    pub(crate) fn component() -> Vec<u8> {
        let import = b"wasi:cli/environment@0.2.0";
        let export = b"wasi:cli/run@0.2.0";
        let mut c = b"\0asm\x0d\0\x01\0".to_vec();
        // type section: one type, an instance type (0x42) with no declarations.
        c.extend_from_slice(&[0x07, 0x03, 0x01, 0x42, 0x00]);
        // import section: one import, plain name, externdesc instance (0x05) of type 0.
        let mut body = vec![0x01, 0x00, import.len() as u8];
        body.extend_from_slice(import);
        body.extend_from_slice(&[0x05, 0x00]);
        c.push(0x0a);
        c.push(body.len() as u8);
        c.extend_from_slice(&body);
        // export section: one export, plain name, sort instance (0x05) index 0, no type.
        let mut body = vec![0x01, 0x00, export.len() as u8];
        body.extend_from_slice(export);
        body.extend_from_slice(&[0x05, 0x00, 0x00]);
        c.push(0x0b);
        c.push(body.len() as u8);
        c.extend_from_slice(&body);
        c
    }

    #[test]
    fn detects_modules_and_components_from_the_preamble() {
        assert_eq!(detect(EMPTY_MODULE), Ok(WasmKind::Module));
        assert_eq!(detect(&component()), Ok(WasmKind::Component));
        assert_eq!(detect(b"\0asm\x0d\0\x01\0"), Ok(WasmKind::Component));
        assert_eq!(detect(b"#!/bin/sh\n"), Err(NotWasm::NoMagic));
        assert_eq!(detect(b"\0as"), Err(NotWasm::NoMagic));
        assert_eq!(detect(b""), Err(NotWasm::NoMagic));
        assert_eq!(
            detect(b"\0asm\x02\0\0\0"),
            Err(NotWasm::UnknownVersion([2, 0, 0, 0]))
        );
        // An older component encoding (0x0a) is not the one Wasmtime reads.
        assert_eq!(
            detect(b"\0asm\x0a\0\x01\0"),
            Err(NotWasm::UnknownVersion([0x0a, 0, 1, 0]))
        );
        // Truncated preamble.
        assert_eq!(detect(b"\0asm\x01\0"), Err(NotWasm::Truncated));
        assert_eq!(WasmKind::Module.artifact_os(), "wasip1");
        assert_eq!(WasmKind::Component.artifact_os(), "wasip2");
    }

    #[test]
    fn reads_a_components_top_level_imports_and_exports() {
        let info = component_info(&component()).unwrap();
        assert_eq!(info.imports, ["wasi:cli/environment@0.2.0"]);
        assert_eq!(info.exports, ["wasi:cli/run@0.2.0"]);
        assert_eq!(info.target, None);
        // A truncated component is an error, not an empty list.
        let c = component();
        assert!(component_info(&c[..c.len() - 3]).is_err());
    }
}
