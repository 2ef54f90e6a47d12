//! The exception classes of the core, and the one mapping from [`crate::error::Error`] to
//! them. `kproxy.errors` re-exports them and derives its own (configuration, API) from
//! [`KproxyError`]. Every instance carries its fields as attributes, set here as it is made,
//! so callers never parse messages.

use crate::error::Error;
use crate::model::IpFamily;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    kproxy._core,
    KproxyError,
    PyException,
    "Base class of every kproxy error."
);
create_exception!(
    kproxy._core,
    CoreInputError,
    KproxyError,
    "The core rejected its input (a change set, an engine configuration, a rule listing)."
);
create_exception!(
    kproxy._core,
    UnsupportedError,
    KproxyError,
    "The mode does not offer the operation asked for."
);
create_exception!(
    kproxy._core,
    ApplyError,
    KproxyError,
    "The kernel or its tool refused rules, or could not be reached. What was programmed \
     before stays in place."
);
create_exception!(
    kproxy._core,
    NetlinkError,
    ApplyError,
    "The kernel answered a netlink request (nftables elements, IPVS) with an error."
);
create_exception!(
    kproxy._core,
    ForwarderError,
    KproxyError,
    "The userspace forwarder could not start or serve."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    for (name, ty) in [
        ("KproxyError", py.get_type::<KproxyError>()),
        ("CoreInputError", py.get_type::<CoreInputError>()),
        ("UnsupportedError", py.get_type::<UnsupportedError>()),
        ("ApplyError", py.get_type::<ApplyError>()),
        ("NetlinkError", py.get_type::<NetlinkError>()),
        ("ForwarderError", py.get_type::<ForwarderError>()),
    ] {
        m.add(name, ty)?;
    }
    // Class-level defaults: what an instance made in Python, or a field its variant lacks,
    // reads. Instances made here override them (see `fill`).
    let none = py.None();
    let apply = py.get_type::<ApplyError>();
    for attr in ["exit_code", "program", "errno", "family"] {
        apply.setattr(attr, &none)?;
    }
    apply.setattr("op", "")?;
    apply.setattr("stderr", "")?;
    apply.setattr("needs_full_sync", true)?;
    py.get_type::<CoreInputError>()
        .setattr("needs_full_sync", false)?;
    let forwarder = py.get_type::<ForwarderError>();
    forwarder.setattr("op", "")?;
    forwarder.setattr("errno", &none)?;
    Ok(())
}

/// The exception for `err`, with its fields.
pub fn to_py(err: Error) -> PyErr {
    build(err, None)
}

/// The exception for `err` met by the engine of `family` (its `family` attribute set).
pub fn in_family(family: IpFamily) -> impl Fn(Error) -> PyErr {
    move |err| build(err, Some(family))
}

fn build(err: Error, family: Option<IpFamily>) -> PyErr {
    Python::attach(|py| {
        let message = err.to_string();
        let exc = match &err {
            Error::InvalidInput(_) => CoreInputError::new_err(message),
            Error::Unsupported(_) => UnsupportedError::new_err(message),
            Error::Spawn { .. } | Error::Apply { .. } => ApplyError::new_err(message),
            Error::Netlink { .. } => NetlinkError::new_err(message),
            Error::Forwarder { .. } => ForwarderError::new_err(message),
        };
        match fill(py, &exc, &err, family) {
            Ok(()) => exc,
            Err(e) => e,
        }
    })
}

fn fill(py: Python<'_>, exc: &PyErr, err: &Error, family: Option<IpFamily>) -> PyResult<()> {
    let value = exc.value(py);
    let set = |name: &str, v: Bound<'_, PyAny>| value.setattr(name, v);
    match err {
        Error::InvalidInput(_) | Error::Unsupported(_) => {}
        Error::Spawn {
            op,
            program,
            source,
        } => {
            set("op", op.into_pyobject(py)?.into_any())?;
            set("program", program.into_pyobject(py)?.into_any())?;
            set("errno", source.raw_os_error().into_pyobject(py)?)?;
            set("stderr", source.to_string().into_pyobject(py)?.into_any())?;
        }
        Error::Apply { op, code, stderr } => {
            set("op", op.into_pyobject(py)?.into_any())?;
            set("exit_code", code.into_pyobject(py)?)?;
            set("stderr", stderr.into_pyobject(py)?.into_any())?;
        }
        Error::Netlink { op, errno, message } => {
            set("op", op.into_pyobject(py)?.into_any())?;
            set("errno", errno.into_pyobject(py)?)?;
            set("stderr", message.into_pyobject(py)?.into_any())?;
        }
        Error::Forwarder { op, source } => {
            set("op", op.into_pyobject(py)?.into_any())?;
            set("errno", source.raw_os_error().into_pyobject(py)?)?;
        }
    }
    if let Some(f) = family {
        set(
            "family",
            super::family_name(f).into_pyobject(py)?.into_any(),
        )?;
    }
    set(
        "needs_full_sync",
        err.needs_full_sync()
            .into_pyobject(py)?
            .to_owned()
            .into_any(),
    )
}
