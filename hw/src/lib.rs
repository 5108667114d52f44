//! Hardware-facing parts of the appliance.
#![deny(unsafe_code)]
