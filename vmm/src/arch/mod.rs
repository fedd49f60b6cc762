//! Architecture-specific boot set-up. cocoon runs x86_64 guests only.

pub mod x86_64;
