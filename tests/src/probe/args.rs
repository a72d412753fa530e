//! The probe's command line, parsed by hand (clap is not among the workspace's dependencies).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::image::Platform;

pub const USAGE: &str = "\
usage: kiln-probe --address SOCK --image REF --runtime RUNTIME [options] [-- ARGS...]

Times one task's phases through containerd's gRPC API, ROUNDS times, with unique ids:
snapshot prepare, container create, mounts, task create, start, start to exit event, and the
cleanup (task delete, container delete, snapshot remove).

  --address SOCK        containerd's gRPC socket
  --namespace NS        containerd namespace (default: default)
  --image REF           an image already in containerd and unpacked for the snapshotter
  --runtime RUNTIME     runtime name, e.g. io.containerd.kiln.v1 or io.containerd.runc.v2
  --platform OS/ARCH    the manifest to use when the image is an index (default: linux/amd64
                        if the index has it, else its first manifest)
  --rounds N            timed rounds (default 10)
  --warmup N            untimed rounds first (default 0)
  --json FILE           write the per-round figures and the summary as JSON
  --label NAME          the name in the table and the JSON, and in the container ids
                        (default: derived from RUNTIME)
  --spec FILE           the spec template (default: the output of `ctr oci spec`)
  --snapshotter NAME    default: overlayfs
  --timeout SECS        how long to wait for the exit event (default 60)
  -- ARGS...            the process's arguments; they replace the image's Entrypoint and
                        Cmd, as with `ctr run IMAGE ID ARGS...`

Exit status: 0 when every round completed (whatever the task's own exit status), 3 when
some round failed (the JSON is still written), 1 when the probe could not start.";

/// What the probe was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub address: PathBuf,
    pub namespace: String,
    pub image: String,
    pub runtime: String,
    pub platform: Option<Platform>,
    pub rounds: usize,
    pub warmup: usize,
    pub json: Option<PathBuf>,
    pub label: String,
    pub spec: Option<PathBuf>,
    pub snapshotter: String,
    pub exit_timeout: Duration,
    /// `Some` when ARGS were given after `--`.
    pub args: Option<Vec<String>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<Options>),
    Help,
}

pub fn parse(argv: impl IntoIterator<Item = String>) -> Result<Command> {
    let mut address = None;
    let mut namespace = None;
    let mut image = None;
    let mut runtime = None;
    let mut platform = None;
    let mut rounds = 10;
    let mut warmup = 0;
    let mut json = None;
    let mut label = None;
    let mut spec = None;
    let mut snapshotter = None;
    let mut timeout = 60;
    let mut args = None;

    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            args = Some(it.by_ref().collect::<Vec<_>>());
            break;
        }
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().with_context(|| format!("{name} wants a value")),
            }
        };
        match name.as_str() {
            "--address" | "-a" => address = Some(PathBuf::from(value()?)),
            "--namespace" | "-n" => namespace = Some(value()?),
            "--image" => image = Some(value()?),
            "--runtime" => runtime = Some(value()?),
            "--platform" => platform = Some(value()?.parse::<Platform>()?),
            "--rounds" => rounds = count(&name, &value()?)?,
            "--warmup" => warmup = count(&name, &value()?)?,
            "--json" => json = Some(PathBuf::from(value()?)),
            "--label" => label = Some(value()?),
            "--spec" => spec = Some(PathBuf::from(value()?)),
            "--snapshotter" => snapshotter = Some(value()?),
            "--timeout" => timeout = count(&name, &value()?)?,
            _ => bail!("unknown argument '{arg}'"),
        }
    }

    let address = address.context("--address is required")?;
    let image = image.context("--image is required")?;
    let runtime = runtime.context("--runtime is required")?;
    ensure!(rounds > 0, "--rounds wants a positive number");
    ensure!(timeout > 0, "--timeout wants a positive number");
    let namespace = namespace.unwrap_or_else(|| "default".to_string());
    check_identifier("--namespace", &namespace)?;
    let snapshotter = snapshotter.unwrap_or_else(|| "overlayfs".to_string());
    let label = label.unwrap_or_else(|| default_label(&runtime));
    ensure!(!label.is_empty(), "--label must not be empty");
    if let Some(a) = &args {
        ensure!(!a.is_empty(), "no ARGS after --");
    }
    Ok(Command::Run(Box::new(Options {
        address,
        namespace,
        image,
        runtime,
        platform,
        rounds,
        warmup,
        json,
        label,
        spec,
        snapshotter,
        exit_timeout: Duration::from_secs(timeout as u64),
        args,
    })))
}

fn count(name: &str, v: &str) -> Result<usize> {
    v.parse::<usize>()
        .with_context(|| format!("{name} wants a number, not '{v}'"))
}

/// containerd's identifier rule (namespaces, container ids): alphanumerics separated by single
/// `.`, `_` or `-`, at most 76 characters. Checked here because the namespace also goes into a
/// gRPC header and a cgroup path.
pub fn check_identifier(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 76
        && s.split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    ensure!(
        ok,
        "{what} '{s}' is not a containerd identifier (letters and digits, separated by single \
         '.', '_' or '-', at most 76 characters)"
    );
    Ok(())
}

/// `io.containerd.kiln.v1` -> `kiln`; anything else is kept, made id-safe.
fn default_label(runtime: &str) -> String {
    let parts: Vec<&str> = runtime.split('.').collect();
    match parts.as_slice() {
        ["io", "containerd", name, _version] => id_safe(name),
        _ => id_safe(runtime),
    }
}

/// The label as it appears in container ids: lower-case alphanumerics and single dashes.
pub fn id_safe(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    mapped
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    fn run(s: &[&str]) -> Options {
        match parse(argv(s)).expect("parses") {
            Command::Run(o) => *o,
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn the_full_command_line() {
        let o = run(&[
            "--address",
            "/tmp/c.sock",
            "--namespace=bench",
            "--image",
            "docker.io/kiln-test/busybox:latest",
            "--runtime",
            "io.containerd.runc.v2",
            "--platform",
            "linux/amd64",
            "--rounds",
            "3",
            "--json",
            "/tmp/p.json",
            "--",
            "echo",
            "hi",
        ]);
        assert_eq!(o.address, PathBuf::from("/tmp/c.sock"));
        assert_eq!(o.namespace, "bench");
        assert_eq!(o.runtime, "io.containerd.runc.v2");
        assert_eq!(o.label, "runc");
        assert_eq!(o.rounds, 3);
        assert_eq!(o.snapshotter, "overlayfs");
        assert_eq!(
            o.platform,
            Some(Platform {
                os: "linux".into(),
                arch: "amd64".into(),
                variant: None
            })
        );
        assert_eq!(o.args, Some(vec!["echo".to_string(), "hi".to_string()]));
    }

    #[test]
    fn defaults_and_errors() {
        let o = run(&[
            "-a",
            "s",
            "--image",
            "i",
            "--runtime",
            "io.containerd.kiln.v1",
        ]);
        assert_eq!(o.namespace, "default");
        assert_eq!(o.label, "kiln");
        assert_eq!(o.rounds, 10);
        assert_eq!(o.args, None);
        assert!(parse(argv(&["--image", "i", "--runtime", "r"])).is_err());
        assert!(
            parse(argv(&[
                "-a",
                "s",
                "--image",
                "i",
                "--runtime",
                "r",
                "--rounds"
            ]))
            .is_err()
        );
        assert!(
            parse(argv(&[
                "-a",
                "s",
                "--image",
                "i",
                "--runtime",
                "r",
                "--rounds",
                "0"
            ]))
            .is_err()
        );
        assert!(
            parse(argv(&[
                "-a",
                "s",
                "--image",
                "i",
                "--runtime",
                "r",
                "-n",
                "a/b"
            ]))
            .is_err()
        );
        assert!(parse(argv(&["-a", "s", "--image", "i", "--runtime", "r", "--"])).is_err());
        assert!(parse(argv(&["--bogus"])).is_err());
        assert_eq!(parse(argv(&["--help"])).expect("help"), Command::Help);
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("x", "default").is_ok());
        assert!(check_identifier("x", "k8s.io").is_ok());
        for bad in ["", "a..b", "-a", "a b", "ä", "a/b"] {
            assert!(check_identifier("x", bad).is_err(), "{bad}");
        }
        assert_eq!(id_safe("My Runtime/1"), "my-runtime-1");
        assert_eq!(default_label("io.containerd.runc.v2"), "runc");
        assert_eq!(default_label("custom"), "custom");
    }
}
