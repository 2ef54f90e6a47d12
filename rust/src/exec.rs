//! Running the kernel's command-line tools (iptables-restore, nft) with input on stdin.

use crate::error::{Error, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// Run `program args`, feeding `stdin` if given; the output whatever the exit status.
pub fn run(
    op: &'static str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<std::process::Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| Error::Spawn {
        op,
        program: program.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(input) = stdin {
        // Write from a thread: a large ruleset would otherwise deadlock against a child
        // that fills its stderr pipe before reading all of its input.
        let mut pipe = child.stdin.take().ok_or_else(|| Error::Apply {
            op,
            code: None,
            stderr: "no stdin pipe".into(),
        })?;
        let data = input.to_owned();
        let writer = std::thread::spawn(move || pipe.write_all(data.as_bytes()));
        let out = child.wait_with_output().map_err(spawn_err)?;
        let _ = writer.join();
        return Ok(out);
    }
    child.wait_with_output().map_err(spawn_err)
}

pub fn check(op: &'static str, out: std::process::Output) -> Result<std::process::Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Apply {
            op,
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
