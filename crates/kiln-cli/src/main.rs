//! `kiln`: the Kiln command-line tool.
//!
//! It packs Wasm modules and components into OCI image tarballs (`kiln image build`) that
//! containerd imports and the Kiln shim runs, and converts images between the Wasm image forms
//! (`kiln image convert`): a Wasm OCI artifact, which `ctr run` refuses, becomes a compat image
//! it runs. All image writing is kiln-image's; this file only maps the command line onto it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use kiln_image::Format;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: tools for Kiln, the containerd shim for WebAssembly/WASI modules"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Build and convert Wasm images
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pack a Wasm module or component into an OCI image-layout tarball
    #[command(after_help = "\
Prints `<reference> <manifest digest>` on stdout.

Forms (--format):
  compat       tar layer holding the module, OCI config with Entrypoint (what Kiln runs)
  layer        runwasi's form: the module as a ...wasm.component.layer.v0+wasm layer
  artifact     CNCF Wasm OCI artifact: application/vnd.wasm.config.v0+json, application/wasm
  wasm-to-oci  wasm-to-oci's form: application/vnd.wasm.content.layer.v1+wasm

Import into containerd with:
  ctr images import --all-platforms FILE.tar")]
    Build(BuildArgs),
    /// Rewrite an image-layout tarball in another form
    #[command(after_help = "\
Keeps the module, its path, Cmd and Env where the new form has room for them; other files
of a compat image are not carried over. E.g. make a Wasm OCI artifact runnable by ctr:
  kiln image convert app-artifact.tar --format compat -o app.tar")]
    Convert(ConvertArgs),
}

/// `kiln image build` arguments.
#[derive(Debug, PartialEq, Eq, Args)]
struct BuildArgs {
    /// The Wasm module or component
    module: PathBuf,
    /// Image reference, normalised like Docker: `hello` -> docker.io/library/hello:latest
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    tag: String,
    /// Where to write the tarball (default: ./<name>.tar)
    #[arg(short, long, value_name = "FILE.tar")]
    output: Option<PathBuf>,
    /// Image platform (default: wasi/wasm for compat and wasm-to-oci; wasip1/wasm or
    /// wasip2/wasm, by module or component, for layer and artifact)
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Path of the module inside the image (default: /<file name of the module>)
    #[arg(long, value_name = "/PATH")]
    path: Option<String>,
    /// Add an environment variable (repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The image form
    #[arg(long, default_value = "compat", value_parser = parse_format)]
    format: Format,
    /// Stored as the image's Cmd (arguments passed to the module)
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

/// `kiln image convert` arguments.
#[derive(Debug, PartialEq, Eq, Args)]
struct ConvertArgs {
    /// The image-layout tarball to read
    input: PathBuf,
    /// The form to write
    #[arg(long, value_parser = parse_format)]
    format: Format,
    /// Where to write the new tarball
    #[arg(short, long, value_name = "FILE.tar")]
    output: PathBuf,
    /// The new image's reference (default: the input's io.containerd.image.name)
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    tag: Option<String>,
    /// The new image's platform (default: the form's)
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Path of the module in the new image (default: the input's)
    #[arg(long, value_name = "/PATH")]
    path: Option<String>,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Top::Image(ImageCommand::Build(b)) => build(b),
        Top::Image(ImageCommand::Convert(c)) => convert(c),
    };
    if let Err(err) = result {
        eprintln!("kiln: error: {err:#}");
        std::process::exit(1);
    }
}

/// Default output file: `<last component of the repository>.tar`.
fn default_output(reference: &kiln_image::Reference) -> PathBuf {
    let name = reference.path.rsplit('/').next().unwrap_or(&reference.path);
    PathBuf::from(format!("{name}.tar"))
}

fn report(summary: &kiln_image::ImageSummary, output: &Path) {
    println!("{} {}", summary.reference, summary.manifest_digest);
    let kind = match summary.kind {
        kiln_image::WasmKind::Module => "module",
        kiln_image::WasmKind::Component => "component",
    };
    eprintln!(
        "wrote {} ({} form, {}, {kind} {})",
        output.display(),
        summary.format,
        summary.platform,
        summary.path_in_image
    );
}

fn build(b: BuildArgs) -> Result<()> {
    let reference = kiln_image::Reference::parse(&b.tag)?;
    let output = b.output.unwrap_or_else(|| default_output(&reference));
    let opts = kiln_image::BuildOptions {
        module: kiln_image::ModuleSource::Path(b.module),
        path_in_image: b.path,
        reference: b.tag,
        platform: b.platform,
        args: b.args,
        env: b.env,
        format: b.format,
        files: Vec::new(),
    };
    let summary = write_atomically(&output, |file| Ok(kiln_image::build(&opts, file)?))?;
    report(&summary, &output);
    Ok(())
}

fn convert(c: ConvertArgs) -> Result<()> {
    let input =
        File::open(&c.input).with_context(|| format!("cannot open {}", c.input.display()))?;
    let opts = kiln_image::ConvertOptions {
        format: c.format,
        reference: c.tag,
        platform: c.platform,
        path_in_image: c.path,
    };
    let summary = write_atomically(&c.output, |file| {
        kiln_image::convert(BufReader::new(input), &opts, file)
            .with_context(|| format!("cannot convert {}", c.input.display()))
    })?;
    report(&summary, &c.output);
    Ok(())
}

/// Writes `path` through a temporary file in the same directory and renames it into place, so
/// a failed build never leaves a truncated tarball behind.
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
    use clap::CommandFactory;

    fn parse(line: &[&str]) -> Result<Top, clap::Error> {
        Cli::try_parse_from(std::iter::once("kiln").chain(line.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_full_build_command() {
        let cmd = parse(&[
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
            "--format",
            "layer",
            "--",
            "x",
            "--not-a-flag",
        ])
        .unwrap();
        let Top::Image(ImageCommand::Build(b)) = cmd else {
            panic!("not a build: {cmd:?}");
        };
        assert_eq!(
            b,
            BuildArgs {
                module: "m.wasm".into(),
                tag: "hello:v1".into(),
                output: Some("out.tar".into()),
                platform: Some("wasip1/wasm".into()),
                path: Some("/app/m.wasm".into()),
                env: vec!["A=1".into(), "B=2".into()],
                format: Format::Layer,
                args: vec!["x".into(), "--not-a-flag".into()],
            }
        );
        let Top::Image(ImageCommand::Build(b)) =
            parse(&["image", "build", "m.wasm", "-t", "x"]).unwrap()
        else {
            panic!("not a build");
        };
        assert_eq!(b.format, Format::Compat);
    }

    #[test]
    fn parses_convert_command() {
        let cmd = parse(&[
            "image", "convert", "in.tar", "--format", "compat", "-o", "out.tar", "-t", "x:1",
        ])
        .unwrap();
        let Top::Image(ImageCommand::Convert(c)) = cmd else {
            panic!("not a convert: {cmd:?}");
        };
        assert_eq!(
            c,
            ConvertArgs {
                input: "in.tar".into(),
                format: Format::Compat,
                output: "out.tar".into(),
                tag: Some("x:1".into()),
                platform: None,
                path: None,
            }
        );
    }

    #[test]
    fn reports_bad_command_lines() {
        for (line, needle) in [
            (
                &["image", "build", "m.wasm", "-t", "x", "--bogus"][..],
                "--bogus",
            ),
            (&["image", "build", "m.wasm"][..], "--tag"),
            (&["image", "build", "-t", "x"][..], "<MODULE>"),
            (
                &["image", "build", "m.wasm", "-t"][..],
                "a value is required",
            ),
            (
                &["image", "build", "a.wasm", "b.wasm", "-t", "x"][..],
                "b.wasm",
            ),
            (
                &["image", "build", "m.wasm", "-t", "x", "-t", "y"][..],
                "multiple times",
            ),
            (
                &["image", "build", "m.wasm", "-t", "x", "--format", "zip"][..],
                "wasm-to-oci",
            ),
            (
                &["image", "convert", "in.tar", "-o", "o.tar"][..],
                "--format",
            ),
            (&["frobnicate"][..], "frobnicate"),
            (&["--frob"][..], "--frob"),
            (&["image", "push"][..], "push"),
        ] {
            let err = parse(line).unwrap_err().to_string();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
    }

    #[test]
    fn help_and_version() {
        for line in [
            &["--version"][..],
            &["--help"],
            &["image", "build", "--help"],
        ] {
            let err = parse(line).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ),
                "{line:?}: {err}"
            );
        }
        let help = parse(&["image", "build", "--help"])
            .unwrap_err()
            .to_string();
        assert!(
            help.contains("--format") && help.contains("artifact"),
            "{help}"
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
