//! The web UI's files (`kez-chat/ui/`), embedded in the binary: the gateway serves only these.

/// One file of the front end.
pub(crate) struct Asset {
    /// Its path under the page's address, e.g. `app.js`.
    pub(crate) path: &'static str,
    /// Its `Content-Type`.
    pub(crate) content_type: &'static str,
    /// Its bytes.
    pub(crate) bytes: &'static [u8],
}

/// Every file the gateway serves.
pub(crate) const ASSETS: &[Asset] = &[
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../ui/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/app.js"),
    },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../ui/style.css"),
    },
    Asset {
        path: "api.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/api.js"),
    },
    Asset {
        path: "text.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/text.js"),
    },
    Asset {
        path: "icons.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/icons.js"),
    },
    Asset {
        path: "dialogs.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/dialogs.js"),
    },
    Asset {
        path: "register.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/register.js"),
    },
    Asset {
        path: "chat.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/chat.js"),
    },
    Asset {
        path: "contacts.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/contacts.js"),
    },
    Asset {
        path: "files.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/files.js"),
    },
    Asset {
        path: "settings.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/settings.js"),
    },
    Asset {
        path: "search.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/search.js"),
    },
    Asset {
        path: "icon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../ui/icon.svg"),
    },
];
