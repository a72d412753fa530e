//! A real program of about 2 MB (regex with its Unicode tables, serde, serde_json, toml,
//! pulldown-cmark, flate2, unicode-normalization/-segmentation, sha2, url with IDNA), for
//! measuring the first start with an empty compile cache.
//!
//! Usage: `big [ROUNDS]` (default 1; more rounds make a longer run for execution-speed tests,
//! with the same output).
//!
//! Each round parses an embedded TOML rule set, compiles the rules' Unicode regexes, runs them
//! over an embedded multilingual text, builds a report, checks that the report survives JSON,
//! TOML and deflate round trips, renders it as Markdown and then HTML, and prints
//! `big: ok <checksum> (<n> words)`, the checksum being the first 8 bytes of the SHA-256 of the
//! JSON report and the HTML. The output is deterministic; it exits 1 with a message on stderr if
//! a check fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::process::exit;

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use pulldown_cmark::{Options, Parser, html};
use regex::RegexBuilder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;
use unicode_segmentation::UnicodeSegmentation;
use url::Url;

const RULES: &str = r#"
title = "kiln big workload"
version = 3

[[rule]]
name = "words"
pattern = '\b\w+\b'

[[rule]]
name = "greek"
pattern = '\p{Greek}+'

[[rule]]
name = "cyrillic"
pattern = '\p{Cyrillic}+'

[[rule]]
name = "han"
pattern = '\p{Han}+'

[[rule]]
name = "capitalised"
pattern = '\b\p{Lu}\p{Ll}+\b'

[[rule]]
name = "numbers"
pattern = '(?P<int>\d+)(?:[.,](?P<frac>\d+))?'

[[rule]]
name = "email"
pattern = '(?P<user>[\w.+-]+)@(?P<host>[\w-]+(?:\.[\w-]+)+)'

[[rule]]
name = "kiln"
pattern = 'kiln|wasm(?:time)?'
case_insensitive = true

[[rule]]
name = "urls"
pattern = 'https?://[^\s)]+'

[[rule]]
name = "dates"
pattern = '(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})'

[[rule]]
name = "punctuation"
pattern = '\p{P}'

[[rule]]
name = "emoji"
pattern = '\p{Extended_Pictographic}'

[[replace]]
pattern = '(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})'
with = '$d/$m/$y'

[[replace]]
pattern = '\s+'
with = ' '
"#;

const TEXT: &str = "\
Kiln runs WebAssembly modules with Wasmtime; contact ops@example.org or build-bot+ci@kiln.dev.
Docs: https://kiln.example/docs/../start?lang=en#top (mirror https://bücher.例え.jp/ÜBER/%7Ekiln).
Released on 2024-03-15, patched 2024-04-02: 3 fixes, 1.5x faster, 12,75 € saved.
Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν.
Съешь же ещё этих мягких французских булок, да выпей чаю.
天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。
Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.
Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë.
WASM and wasm and Wasm: the KILN shim 🔥 compiles once per node 🚀.
";

#[derive(Debug, Deserialize)]
struct Rules {
    title: String,
    version: u32,
    rule: Vec<Rule>,
    replace: Vec<Replace>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    name: String,
    pattern: String,
    #[serde(default)]
    case_insensitive: bool,
}

#[derive(Debug, Deserialize)]
struct Replace {
    pattern: String,
    with: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Report {
    title: String,
    version: u32,
    lines: usize,
    rules: BTreeMap<String, RuleReport>,
    rewritten: Vec<String>,
    text: Vec<LineReport>,
    urls: Vec<String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct LineReport {
    graphemes: usize,
    words: usize,
    sentences: usize,
    nfd_chars: usize,
    nfkc: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct RuleReport {
    matches: usize,
    per_line: Vec<usize>,
    first: Option<String>,
    groups: BTreeMap<String, Vec<String>>,
}

fn fail(msg: String) -> ! {
    eprintln!("big: {msg}");
    exit(1);
}

/// The report as a Markdown document: a table of rule counts and the rewritten lines.
fn markdown(report: &Report) -> String {
    let mut md = format!("# {} (v{})\n\n", report.title, report.version);
    md.push_str("| rule | matches | first |\n|---|---:|---|\n");
    for (name, r) in &report.rules {
        let first = r.first.as_deref().unwrap_or("").replace('|', "\\|");
        let _ = writeln!(md, "| `{name}` | {} | {first} |", r.matches);
    }
    md.push_str("\n## Lines\n\n");
    for (i, (line, t)) in report.rewritten.iter().zip(&report.text).enumerate() {
        let _ = writeln!(
            md,
            "{}. *{line}* ({} graphemes, **{}** words)",
            i + 1,
            t.graphemes,
            t.words
        );
    }
    md.push_str("\n> Rendered by ~~hand~~ pulldown-cmark.[^1]\n\n[^1]: deterministically.\n");
    md
}

fn build_report(rules: Rules) -> Report {
    let lines: Vec<&str> = TEXT.lines().collect();
    let mut report = Report {
        title: rules.title,
        version: rules.version,
        lines: lines.len(),
        rules: BTreeMap::new(),
        rewritten: Vec::new(),
        text: Vec::new(),
        urls: Vec::new(),
    };
    for rule in &rules.rule {
        let re = RegexBuilder::new(&rule.pattern)
            .case_insensitive(rule.case_insensitive)
            .build()
            .unwrap_or_else(|e| fail(format!("rule {}: {e}", rule.name)));
        let names: Vec<&str> = re.capture_names().flatten().collect();
        let mut r = RuleReport {
            matches: 0,
            per_line: Vec::with_capacity(lines.len()),
            first: None,
            groups: names.iter().map(|n| (n.to_string(), Vec::new())).collect(),
        };
        for line in &lines {
            let mut n = 0;
            for caps in re.captures_iter(line) {
                n += 1;
                if r.first.is_none() {
                    r.first = Some(caps[0].to_string());
                }
                for name in &names {
                    if let Some(m) = caps.name(name) {
                        r.groups
                            .get_mut(*name)
                            .unwrap()
                            .push(m.as_str().to_string());
                    }
                }
            }
            r.matches += n;
            r.per_line.push(n);
        }
        if rule.name == "urls" {
            for m in re.find_iter(TEXT) {
                match Url::parse(m.as_str()) {
                    Ok(url) => report.urls.push(url.to_string()),
                    Err(e) => fail(format!("url {}: {e}", m.as_str())),
                }
            }
        }
        report.rules.insert(rule.name.clone(), r);
    }
    let replacers: Vec<_> = rules
        .replace
        .iter()
        .map(|r| match RegexBuilder::new(&r.pattern).build() {
            Ok(re) => (re, r.with.as_str()),
            Err(e) => fail(format!("replace {}: {e}", r.pattern)),
        })
        .collect();
    for line in &lines {
        let mut s = line.to_string();
        for (re, with) in &replacers {
            s = re.replace_all(&s, *with).into_owned();
        }
        report.rewritten.push(s.to_lowercase());
        report.text.push(LineReport {
            graphemes: line.graphemes(true).count(),
            words: line.unicode_words().count(),
            sentences: line.unicode_sentences().count(),
            nfd_chars: line.nfd().count(),
            nfkc: line.nfkc().collect(),
        });
    }
    report
}

/// One round of the work; returns the line to print.
fn round() -> String {
    let rules: Rules = toml::from_str(RULES).unwrap_or_else(|e| fail(format!("rules: {e}")));
    let report = build_report(rules);

    let json = serde_json::to_string_pretty(&report).unwrap_or_else(|e| fail(format!("{e}")));
    let back: Report = serde_json::from_str(&json).unwrap_or_else(|e| fail(format!("{e}")));
    if back != report {
        fail("JSON round trip changed the report".to_string());
    }
    let value: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| fail(e.to_string()));
    let as_toml = toml::to_string(&value).unwrap_or_else(|e| fail(format!("to TOML: {e}")));
    let back: Report = toml::from_str(&as_toml).unwrap_or_else(|e| fail(format!("from TOML: {e}")));
    if back != report {
        fail("TOML round trip changed the report".to_string());
    }

    let mut enc = DeflateEncoder::new(Vec::new(), Compression::best());
    let packed = enc
        .write_all(json.as_bytes())
        .and_then(|()| enc.finish())
        .unwrap_or_else(|e| fail(format!("deflate: {e}")));
    let mut unpacked = String::new();
    DeflateDecoder::new(packed.as_slice())
        .read_to_string(&mut unpacked)
        .unwrap_or_else(|e| fail(format!("inflate: {e}")));
    if unpacked != json {
        fail("deflate round trip changed the report".to_string());
    }

    let md = markdown(&report);
    let mut html = String::new();
    html::push_html(&mut html, Parser::new_ext(&md, Options::all()));
    if !html.contains("<table>") || !html.contains("<ol>") {
        fail(format!("unexpected HTML:\n{html}"));
    }

    let digest = Sha256::new()
        .chain_update(json.as_bytes())
        .chain_update(html.as_bytes())
        .finalize();
    let checksum: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let words: usize = report.text.iter().map(|t| t.words).sum();
    format!("big: ok {checksum} ({words} words)")
}

fn main() {
    let rounds = match std::env::args().nth(1) {
        None => 1,
        Some(arg) => match arg.parse::<u32>() {
            Ok(n) => n,
            _ => fail(format!("usage: big [ROUNDS]; not a number: {arg}")),
        },
    };
    if rounds == 0 {
        // Started and nothing else: what a start of a module this size costs, without its work.
        println!("big: 0 rounds");
        return;
    }
    let line = round();
    for _ in 1..rounds {
        if round() != line {
            fail("a later round gave a different result".to_string());
        }
    }
    println!("{line}");
}
