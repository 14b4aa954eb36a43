//! The module's link contract with Envoy 1.40, checked on the real binaries' dynamic symbol
//! tables (read with the `object` crate): every callback the module imports is exported by Envoy
//! (else dlopen fails, or worse, a lazily bound call aborts at run time), and every hook Envoy
//! requires is exported by the module.

use object::{Object, ObjectSymbol};
use sandbox_gateway_harness::envoy::{envoy_bin, module_dir};
use std::collections::BTreeSet;
use std::path::Path;

/// The names in the ELF dynamic symbol table (`.dynsym`, what the dynamic linker resolves):
/// `defined` = exported by this file, else imported (undefined here, expected from another).
fn dynamic_symbols(path: &Path, defined: bool) -> BTreeSet<String> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let file = object::File::parse(&*data)
        .unwrap_or_else(|e| panic!("{} is not an object file: {e}", path.display()));
    let names: BTreeSet<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_undefined() != defined)
        .map(|s| {
            s.name()
                .unwrap_or_else(|e| panic!("a symbol name in {}: {e}", path.display()))
                .to_string()
        })
        .filter(|n| !n.is_empty())
        .collect();
    assert!(
        !names.is_empty(),
        "no {} dynamic symbols in {} (not a dynamically linked ELF file?)",
        if defined { "defined" } else { "undefined" },
        path.display()
    );
    names
}

const MANDATORY_HOOKS: &[&str] = &[
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
];

#[test]
fn module_imports_only_callbacks_envoy_exports() {
    let envoy = envoy_bin().unwrap();
    let module = module_dir().unwrap().join("libsandbox_gateway.so");
    let exported = dynamic_symbols(&envoy, true);
    let imported: BTreeSet<String> = dynamic_symbols(&module, false)
        .into_iter()
        .filter(|s| s.starts_with("envoy_dynamic_module_callback_"))
        .collect();
    assert!(
        imported.len() >= 10,
        "suspiciously few callbacks imported: {imported:?}"
    );
    let missing: Vec<_> = imported.iter().filter(|s| !exported.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "module imports callbacks Envoy 1.40 does not export: {missing:?}"
    );
}

#[test]
fn module_exports_every_mandatory_hook() {
    let module = module_dir().unwrap().join("libsandbox_gateway.so");
    let defined = dynamic_symbols(&module, true);
    let missing: Vec<_> = MANDATORY_HOOKS
        .iter()
        .filter(|h| !defined.contains(**h))
        .collect();
    assert!(
        missing.is_empty(),
        "module lacks mandatory hooks: {missing:?}"
    );
}
