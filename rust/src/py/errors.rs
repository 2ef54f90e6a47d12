//! The one mapping from [`crate::error::Error`] to `kproxy.errors`.

use crate::error::Error;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Build the `kproxy.errors` exception for `err`, with structured attributes.
pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| build(py, &err).unwrap_or_else(|e| e))
}

fn build(py: Python<'_>, err: &Error) -> Result<PyErr, PyErr> {
    let module = py.import("kproxy.errors")?;
    let kwargs = PyDict::new(py);
    let class = match err {
        Error::InvalidInput(_) => "CoreInputError",
        Error::Spawn {
            op,
            program,
            source,
        } => {
            kwargs.set_item("op", *op)?;
            kwargs.set_item("program", program)?;
            kwargs.set_item("errno", source.raw_os_error())?;
            kwargs.set_item("exit_code", py.None())?;
            kwargs.set_item("stderr", source.to_string())?;
            "ApplyError"
        }
        Error::Apply { op, code, stderr } => {
            kwargs.set_item("op", *op)?;
            kwargs.set_item("exit_code", *code)?;
            kwargs.set_item("stderr", stderr)?;
            "ApplyError"
        }
    };
    kwargs.set_item("needs_full_sync", err.needs_full_sync())?;
    let cls = module.getattr(class)?;
    let exc = cls.call((err.to_string(),), Some(&kwargs))?;
    Ok(PyErr::from_value(exc))
}
