//! `kiln`: the Kiln command-line tool.
//!
//! For now it only packs Wasm modules into OCI image tarballs
//! (`kiln image build`) so they can be imported into containerd and run by
//! the Kiln shim. Arguments are parsed by hand to keep the dependency tree
//! small.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

const VERSION: &str = env!("CARGO_PKG_VERSION");

const MAIN_HELP: &str = "\
kiln: tools for Kiln, the containerd shim for WebAssembly/WASI modules

Usage:
  kiln image build <module.wasm> -t NAME[:TAG] [options] [-- ARGS...]
  kiln --version
  kiln --help

Commands:
  image build   Pack a Wasm module into an OCI image tarball

Run `kiln image build --help` for the build options.
";

const BUILD_HELP: &str = "\
Pack a Wasm module into an OCI image-layout tarball (also loadable by `docker load`).

Usage:
  kiln image build <module.wasm> -t NAME[:TAG] [options] [-- ARGS...]

Options:
  -t, --tag NAME[:TAG]     Image reference (required); normalised like Docker:
                           `hello` -> docker.io/library/hello:latest
  -o, --output FILE.tar    Where to write the tarball (default: ./<name>.tar)
      --platform OS/ARCH   Image platform (default: wasi/wasm)
      --path /PATH         Path of the module inside the image
                           (default: /<file name of the module>)
      --env KEY=VALUE      Add an environment variable (repeatable)
  -h, --help               Show this help
  --                       Everything after is stored as the image's Cmd
                           (arguments passed to the module)

Prints `<reference> <manifest digest>` on stdout.

Import into containerd with:
  ctr images import --platform wasi/wasm FILE.tar
";

/// Parsed `kiln image build` arguments.
#[derive(Debug, PartialEq, Eq)]
struct BuildArgs {
    module: PathBuf,
    tag: String,
    output: Option<PathBuf>,
    platform: Option<String>,
    path: Option<String>,
    env: Vec<String>,
    args: Vec<String>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help(&'static str),
    Version,
    Build(BuildArgs),
}

fn main() {
    if let Err(err) = run() {
        eprintln!("kiln: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a: OsString| {
            a.into_string()
                .map_err(|a| anyhow!("argument is not valid UTF-8: {}", a.to_string_lossy()))
        })
        .collect::<Result<_>>()?;
    match parse(&args)? {
        Command::Help(text) => print!("{text}"),
        Command::Version => println!("kiln {VERSION}"),
        Command::Build(b) => build(b)?,
    }
    Ok(())
}

fn parse(args: &[String]) -> Result<Command> {
    match args.first().map(String::as_str) {
        None => bail!("no command given; run `kiln --help`"),
        Some("-h" | "--help" | "help") => Ok(Command::Help(MAIN_HELP)),
        Some("-V" | "--version" | "version") => Ok(Command::Version),
        Some("image") => match args.get(1).map(String::as_str) {
            Some("build") => parse_build(&args[2..]),
            Some("-h" | "--help") | None => Ok(Command::Help(MAIN_HELP)),
            Some(other) => bail!("unknown command `kiln image {other}`; run `kiln --help`"),
        },
        Some(other) if other.starts_with('-') => {
            bail!("unknown option `{other}`; run `kiln --help`")
        }
        Some(other) => bail!("unknown command `{other}`; run `kiln --help`"),
    }
}

fn parse_build(args: &[String]) -> Result<Command> {
    let mut module: Option<PathBuf> = None;
    let mut tag = None;
    let mut output = None;
    let mut platform = None;
    let mut path = None;
    let mut env = Vec::new();
    let mut extra = Vec::new();

    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| anyhow!("option `{name}` needs a value")),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help(BUILD_HELP)),
            "-t" | "--tag" => set_once(&mut tag, value(flag)?, flag)?,
            "-o" | "--output" => set_once(&mut output, PathBuf::from(value(flag)?), flag)?,
            "--platform" => set_once(&mut platform, value(flag)?, flag)?,
            "--path" => set_once(&mut path, value(flag)?, flag)?,
            "--env" | "-e" => env.push(value(flag)?),
            "--" => {
                extra.extend(it.by_ref().cloned());
                break;
            }
            f if f.starts_with('-') && f.len() > 1 => {
                bail!("unknown option `{f}` for `kiln image build`; run `kiln image build --help`")
            }
            _ => {
                if let Some(first) = &module {
                    bail!(
                        "more than one module given (`{}` and `{arg}`); put module arguments after `--`",
                        first.display()
                    );
                }
                module = Some(PathBuf::from(arg));
            }
        }
    }

    let module = module.ok_or_else(|| {
        anyhow!("no module given; usage: kiln image build <module.wasm> -t NAME[:TAG]")
    })?;
    let tag = tag.ok_or_else(|| anyhow!("no image name given; use -t NAME[:TAG]"))?;
    Ok(Command::Build(BuildArgs {
        module,
        tag,
        output,
        platform,
        path,
        env,
        args: extra,
    }))
}

fn set_once<T>(slot: &mut Option<T>, value: T, flag: &str) -> Result<()> {
    if slot.is_some() {
        bail!("option `{flag}` given more than once");
    }
    *slot = Some(value);
    Ok(())
}

/// Default output file: `<last component of the repository>.tar`.
fn default_output(reference: &kiln_image::Reference) -> PathBuf {
    let name = reference.path.rsplit('/').next().unwrap_or(&reference.path);
    PathBuf::from(format!("{name}.tar"))
}

fn build(b: BuildArgs) -> Result<()> {
    let reference = kiln_image::Reference::parse(&b.tag)?;
    let output = b.output.unwrap_or_else(|| default_output(&reference));
    let opts = kiln_image::BuildOptions {
        module: kiln_image::ModuleSource::Path(b.module),
        path_in_image: b.path,
        reference: b.tag,
        platform: b
            .platform
            .unwrap_or_else(|| kiln_image::DEFAULT_PLATFORM.to_string()),
        args: b.args,
        env: b.env,
    };
    let summary = write_atomically(&output, |file| Ok(kiln_image::build(&opts, file)?))?;
    println!("{} {}", summary.reference, summary.manifest_digest);
    eprintln!(
        "wrote {} ({}, module {})",
        output.display(),
        summary.platform,
        summary.path_in_image
    );
    Ok(())
}

/// Writes `path` through a temporary file in the same directory and renames
/// it into place, so a failed build never leaves a truncated tarball behind.
fn write_atomically<T>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<T>,
) -> Result<T> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("output path {} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = File::create(&tmp)
            .with_context(|| format!("cannot create output file {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let value = write(&mut out)?;
        out.flush()?;
        out.get_ref()
            .sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn parses_full_build_command() {
        let cmd = parse(&args(&[
            "image",
            "build",
            "m.wasm",
            "-t",
            "hello:v1",
            "--output=out.tar",
            "--platform",
            "wasip1/wasm",
            "--path",
            "/app/m.wasm",
            "--env",
            "A=1",
            "-e",
            "B=2",
            "--",
            "x",
            "--not-a-flag",
        ]))
        .unwrap();
        assert_eq!(
            cmd,
            Command::Build(BuildArgs {
                module: "m.wasm".into(),
                tag: "hello:v1".into(),
                output: Some("out.tar".into()),
                platform: Some("wasip1/wasm".into()),
                path: Some("/app/m.wasm".into()),
                env: vec!["A=1".into(), "B=2".into()],
                args: vec!["x".into(), "--not-a-flag".into()],
            })
        );
    }

    #[test]
    fn reports_bad_command_lines() {
        for (line, needle) in [
            (
                &["image", "build", "m.wasm", "-t", "x", "--bogus"][..],
                "unknown option `--bogus`",
            ),
            (&["image", "build", "m.wasm"][..], "-t NAME"),
            (&["image", "build", "-t", "x"][..], "no module"),
            (&["image", "build", "m.wasm", "-t"][..], "needs a value"),
            (
                &["image", "build", "a.wasm", "b.wasm", "-t", "x"][..],
                "more than one module",
            ),
            (
                &["image", "build", "m.wasm", "-t", "x", "-t", "y"][..],
                "more than once",
            ),
            (&["frobnicate"][..], "unknown command"),
            (&["--frob"][..], "unknown option"),
            (&["image", "push"][..], "unknown command"),
            (&[][..], "no command"),
        ] {
            let err = parse(&args(line)).unwrap_err().to_string();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&args(&["--version"])).unwrap(), Command::Version);
        assert_eq!(parse(&args(&["--help"])).unwrap(), Command::Help(MAIN_HELP));
        assert_eq!(
            parse(&args(&["image", "build", "--help"])).unwrap(),
            Command::Help(BUILD_HELP)
        );
    }

    #[test]
    fn default_output_uses_last_path_component() {
        let r = kiln_image::Reference::parse("kiln-test/hello:latest").unwrap();
        assert_eq!(default_output(&r), PathBuf::from("hello.tar"));
        let r = kiln_image::Reference::parse("hello").unwrap();
        assert_eq!(default_output(&r), PathBuf::from("hello.tar"));
    }
}
