//! What the binary and the operator agree on, at the bottom of the tree so that both sides use it
//! and neither uses the other: the environment variables the pods get (`env`), the documents the
//! short Jobs report in their termination messages (`report`), the exit codes the Jobs' pod
//! failure policy reads, and the include globs a source takes by default. Uses nothing.

pub mod env;
pub mod report;

/// The exit code of a failure that no retry can fix (sysexits' `EX_CONFIG`): the model file or
/// its variant is missing or unusable, the collection holds another model's vectors or another
/// index type, another index owns it, or a setting is invalid. The embedding Jobs' pod failure
/// policy fails the Job at once on it instead of retrying a pod that will fail the same way.
pub const EXIT_CONFIG: u8 = 78;

/// The objects a source indexes when it names no include globs.
pub const DEFAULT_INCLUDE: &[&str] = &["**/*.jpg", "**/*.jpeg", "**/*.png", "**/*.webp"];
