//! Image references and platforms, parsed and normalised the way Docker and containerd do,
//! so that the name `ctr images import` gives an image is the one a user typed.

use std::fmt;

use crate::Error;

/// An OCI platform (`os/arch[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system, e.g. `wasi`.
    pub os: String,
    /// Architecture, e.g. `wasm`.
    pub architecture: String,
    /// Optional architecture variant, e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant` (e.g. `wasi/wasm`, `wasip1/wasm`,
    /// `linux/arm64/v8`).
    pub fn parse(s: &str) -> Result<Platform, Error> {
        let err = |reason: &str| Error::InvalidPlatform {
            platform: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(err("wrong number of components"));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(err("empty component"));
            }
            if !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(err("components may only contain [A-Za-z0-9_.-]"));
            }
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A Docker-style image reference, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry domain, e.g. `docker.io` or `localhost:5000`.
    pub domain: String,
    /// Repository path, e.g. `library/hello`.
    pub path: String,
    /// Tag, e.g. `latest`.
    pub tag: String,
}

/// Docker Hub's canonical domain.
const DOCKER_HUB: &str = "docker.io";

impl Reference {
    /// Parses and normalises a reference like Docker does: a bare `name`
    /// becomes `docker.io/library/name`, `user/name` becomes
    /// `docker.io/user/name`, and a missing tag becomes `latest`. Digests
    /// (`@sha256:…`) are rejected: the digest is an output of the build.
    pub fn parse(s: &str) -> Result<Reference, Error> {
        let err = |reason: &str| Error::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty reference"));
        }
        if s.contains('@') {
            return Err(err("digest references are not supported; give a tag"));
        }
        // The tag is after the last ':' that follows the last '/', so that a
        // registry port (`localhost:5000/x`) is not taken for a tag.
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match s[last_slash..].rfind(':') {
            Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
            None => (s, "latest"),
        };
        if !valid_tag(tag) {
            return Err(err("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let domain = if domain == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            domain
        };
        if !valid_domain(&domain) {
            return Err(err("invalid registry domain"));
        }
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(err(
                "repository name components must be lowercase [a-z0-9] separated by '.', '_', '__' or '-'",
            ));
        }
        if domain.len() + 1 + path.len() > 255 {
            return Err(err("repository name longer than 255 characters"));
        }
        Ok(Reference {
            domain,
            path,
            tag: tag.to_string(),
        })
    }

    /// The full form, e.g. `docker.io/library/hello:latest`.
    pub fn full(&self) -> String {
        format!("{}/{}:{}", self.domain, self.path, self.tag)
    }

    /// The short form Docker shows, e.g. `hello:latest` or `user/app:v1`;
    /// other registries keep their domain.
    pub fn familiar(&self) -> String {
        if self.domain != DOCKER_HUB {
            return self.full();
        }
        // Docker shortens `library/x` to `x`, but leaves `library/a/b` alone.
        match self.path.strip_prefix("library/") {
            Some(short) if !short.contains('/') => format!("{short}:{}", self.tag),
            _ => format!("{}:{}", self.path, self.tag),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full())
    }
}

fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return false,
    }
    tag.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path component.
fn valid_path_component(comp: &str) -> bool {
    let b = comp.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &comp[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_parsing() {
        let p = Platform::parse("wasi/wasm").unwrap();
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant),
            ("wasi", "wasm", None)
        );
        let p = Platform::parse("wasip1/wasm").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("wasip1", "wasm"));
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        for bad in [
            "",
            "wasi",
            "wasi/",
            "/wasm",
            "a/b/c/d",
            "wa si/wasm",
            "wasi//wasm",
        ] {
            assert!(
                matches!(Platform::parse(bad), Err(Error::InvalidPlatform { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn reference_normalisation() {
        let cases = [
            ("hello", "docker.io/library/hello:latest", "hello:latest"),
            (
                "hello:latest",
                "docker.io/library/hello:latest",
                "hello:latest",
            ),
            ("hello:v1.2", "docker.io/library/hello:v1.2", "hello:v1.2"),
            ("user/app", "docker.io/user/app:latest", "user/app:latest"),
            (
                "kiln-test/hello:latest",
                "docker.io/kiln-test/hello:latest",
                "kiln-test/hello:latest",
            ),
            ("docker.io/library/x:1", "docker.io/library/x:1", "x:1"),
            ("docker.io/x", "docker.io/library/x:latest", "x:latest"),
            ("index.docker.io/u/x", "docker.io/u/x:latest", "u/x:latest"),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            (
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
            ),
            ("ghcr.io/o/r:v1", "ghcr.io/o/r:v1", "ghcr.io/o/r:v1"),
            (
                "registry.example.com:443/x",
                "registry.example.com:443/x:latest",
                "registry.example.com:443/x:latest",
            ),
            ("a/b/c", "docker.io/a/b/c:latest", "a/b/c:latest"),
            (
                "my_app.v2-x",
                "docker.io/library/my_app.v2-x:latest",
                "my_app.v2-x:latest",
            ),
        ];
        for (input, full, familiar) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.full(), full, "{input}");
            assert_eq!(r.familiar(), familiar, "{input}");
        }
        let r = Reference::parse("hello:v1").unwrap();
        assert_eq!(r.tag, "v1");
        assert_eq!(r.path, "library/hello");
        assert_eq!(r.domain, "docker.io");
        for bad in [
            "",
            "Hello",
            "hello:",
            "hello:-x",
            "a//b",
            "/hello",
            "hello/",
            "x@sha256:0000",
            "a..b",
            "a___b",
            "hello:a b",
            "-a",
        ] {
            assert!(
                matches!(Reference::parse(bad), Err(Error::InvalidReference { .. })),
                "{bad:?} accepted"
            );
        }
    }
}
