//! Micro benchmarks for the per-request path of the routing core: ID validation, key extraction
//! (header, Host and path forms) and route lookup in tables of 1k and 100k sandboxes.
//! Run with `cargo bench -p sandbox-gateway-routing` (or `make bench-micro`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use routing::file_source::parse_routes;
use routing::key::validate_id;
use routing::key::HeaderNames;
use routing::{extract, KeyConfig, KeyError, RequestView, RouteTable};
use std::hint::black_box;
use std::path::Path;

/// A request as the filter sees it: a few headers, an authority and a path.
struct Req {
    headers: Vec<(&'static str, &'static [u8])>,
    authority: &'static [u8],
    path: &'static [u8],
}

impl RequestView for Req {
    fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
        let mut it = self.headers.iter().filter(|(n, _)| *n == name);
        let first = it.next().map(|(_, v)| *v);
        if it.next().is_some() {
            return Err(KeyError::DuplicateHeader);
        }
        Ok(first)
    }
    fn authority(&self) -> Option<&[u8]> {
        Some(self.authority)
    }
    fn path(&self) -> Option<&[u8]> {
        Some(self.path)
    }
}

fn key_config() -> KeyConfig {
    KeyConfig {
        headers: Some(HeaderNames::default()),
        host_domains: vec!["sandbox.example.com".into()],
        path_prefix: Some("/sandboxes".into()),
    }
}

/// Typical browser-ish header set, so the header scan is not trivially short.
fn common_headers() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("user-agent", b"agent/1.0"),
        ("accept", b"*/*"),
        ("accept-encoding", b"gzip"),
        ("content-type", b"application/json"),
    ]
}

fn bench_validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate_id");
    for (name, id) in [
        ("short", &b"sb-000042"[..]),
        ("uuid", &b"3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65"[..]),
        ("max63", &[b'a'; 63][..]),
        ("invalid", &b"Bad_ID!"[..]),
    ] {
        g.throughput(Throughput::Bytes(id.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), id, |b, id| {
            b.iter(|| {
                let _ = black_box(validate_id(black_box(id)));
            })
        });
    }
    g.finish();
}

fn bench_extract(c: &mut Criterion) {
    let cfg = key_config();
    let mut header = common_headers();
    header.push(("x-sandbox-id", b"sb-000042"));
    header.push(("x-sandbox-port", b"8080"));
    let cases = [
        (
            "header",
            Req {
                headers: header,
                authority: b"gateway.example.com",
                path: b"/api/run",
            },
        ),
        (
            "host",
            Req {
                headers: common_headers(),
                authority: b"8080-sb-000042.sandbox.example.com",
                path: b"/api/run",
            },
        ),
        (
            "path",
            Req {
                headers: common_headers(),
                authority: b"gateway.example.com",
                path: b"/sandboxes/sb-000042/8080/api/run?x=1",
            },
        ),
    ];
    let mut g = c.benchmark_group("extract");
    for (name, req) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let key = extract(black_box(&cfg), black_box(req)).expect("valid key");
                black_box(key.id.len());
            })
        });
    }
    g.finish();
}

/// A table of `n` routes, built through the routes-file parser (the documented file format) so
/// the benchmark does not depend on `RouteSpec`'s fields.
fn table_with(n: usize) -> (RouteTable, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("sb-{i:06}")).collect();
    let entries: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            format!(
                r#"{{"id":"{id}","ip":"10.{}.{}.{}","port":8080}}"#,
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )
        })
        .collect();
    let json = format!(r#"{{"sandboxes":[{}]}}"#, entries.join(","));
    let specs = parse_routes(Path::new("bench-routes.json"), json.as_bytes()).expect("routes");
    let table = RouteTable::new();
    for spec in specs {
        table.upsert(spec);
    }
    (table, ids)
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [1_000usize, 100_000] {
        let (table, ids) = table_with(n);
        assert_eq!(table.len(), n as u64);
        // Walk the IDs with a stride co-prime to n, so consecutive lookups touch different
        // entries (no single hot cache line) without a random generator in the timed loop.
        let stride = 7919 % n;
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("hit", n), |b| {
            b.iter(|| {
                i = (i + stride) % n;
                let route = table.get(black_box(&ids[i])).expect("route");
                black_box(route.spec.port);
            })
        });
        g.bench_function(BenchmarkId::new("miss", n), |b| {
            b.iter(|| black_box(table.get(black_box("sb-missing")).is_none()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_validate, bench_extract, bench_lookup);
criterion_main!(benches);
