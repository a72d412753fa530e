//! `kiln_plan::resolve_in_root` on arbitrary guest paths over the tree of
//! `kiln_fuzz::fixture` (symlinks absolute and relative, above the root, at host paths beside
//! it, loops, a chain over the limit, a non-UTF-8 name).
//!
//! The input is the guest path (lossy UTF-8). On success the result must start with the root,
//! have no `..` component, and, with every symlink of its existing part resolved by the host,
//! still lie inside the root: an image's symlinks cannot lead the plan out of its rootfs.
//! Resolving the result again, relative to the root, must give the result back (it holds no
//! symlink left to follow). An error may only be the symlink limit.

#![no_main]

use kiln_fuzz::{has_parent_dir, really_inside, tree};
use kiln_plan::{PlanError, resolve_in_root};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let guest = String::from_utf8_lossy(data);
    let root = &tree().root;
    match resolve_in_root(root, &guest) {
        Ok(host) => {
            assert!(
                host.starts_with(root),
                "{guest:?} -> {host:?}: not below the root"
            );
            assert!(
                !has_parent_dir(&host),
                "{guest:?} -> {host:?}: has a .. component"
            );
            assert!(
                really_inside(&host, root),
                "{guest:?} -> {host:?}: really outside the root"
            );
            let rest = host.strip_prefix(root).expect("below the root");
            let again = resolve_in_root(root, &rest.to_string_lossy())
                .unwrap_or_else(|e| panic!("{guest:?} -> {host:?}: resolving again: {e}"));
            // A name that is not UTF-8 cannot be written as a guest path; only compare those
            // that can.
            if rest.to_str().is_some() {
                assert_eq!(
                    again, host,
                    "{guest:?}: resolving the result again moves it"
                );
            }
        }
        Err(PlanError::Resolve { reason, .. }) => assert!(
            reason.contains("too many levels of symbolic links"),
            "{guest:?}: unexpected error {reason}"
        ),
        Err(e) => panic!("{guest:?}: unexpected error {e}"),
    }
});
