//! The actions: POSTs carrying the console's CSRF token, through [`emmett_seaorm::admin`]
//! (the calls the command line makes); refused unless the console enables them.

use axum::Extension;
use axum::extract::{Form, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use emmett_seaorm::admin;
use serde::Deserialize;

use crate::view::{self, encode};
use crate::{AppState, Base, Failure};

/// An action's form.
#[derive(Debug, Deserialize)]
pub struct ActionForm {
    csrf: String,
    store: String,
    projection: String,
    tenant: String,
}

/// `POST /actions/resume`: run a parked tenant now.
pub async fn resume(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allowed(&shared, &form.csrf)?;
    let (_, store) = shared.store(Some(&form.store))?;
    let outcome = admin::resume(store, &form.projection, Some(&form.tenant)).await;
    view::forget(&shared).await;
    let message = outcome.map(|_| format!("{} / {}: resumed, running again now", form.projection, form.tenant));
    Ok(back(&base, "parked", message.map_err(|e| e.to_string())))
}

/// `POST /actions/skip`: go past the event a tenant failed on.
pub async fn skip(
    State(shared): State<AppState>,
    Extension(Base(base)): Extension<Base>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    allowed(&shared, &form.csrf)?;
    let (_, store) = shared.store(Some(&form.store))?;
    let outcome = admin::skip(store, &form.projection, &form.tenant).await;
    view::forget(&shared).await;
    let message = outcome.map(|s| {
        format!(
            "{} / {}: skipped event {} of stream '{}' (recorded in emt_skipped_events)",
            form.projection, form.tenant, s.stream_position, s.stream_id
        )
    });
    Ok(back(&base, "parked", message.map_err(|e| e.to_string())))
}

/// Refuses the action unless actions are on and the form carries this console's token.
pub(crate) fn allowed(shared: &crate::Shared, csrf: &str) -> Result<(), Failure> {
    if !shared.actions {
        return Err(Failure(StatusCode::FORBIDDEN, "this console is read-only: actions are not enabled".into()));
    }
    if csrf != shared.csrf {
        return Err(Failure(StatusCode::FORBIDDEN, "the form's token is not this console's: reload the page".into()));
    }
    Ok(())
}

/// Back to `page` after an action, saying what it did or why it didn't.
pub(crate) fn back(base: &str, page: &str, outcome: Result<String, String>) -> Response {
    let query = match outcome {
        Ok(done) => format!("done={}", encode(&done)),
        Err(error) => format!("error={}", encode(&error)),
    };
    (StatusCode::SEE_OTHER, [(header::LOCATION, format!("{base}/{page}?{query}"))]).into_response()
}
