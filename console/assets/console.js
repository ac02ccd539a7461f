// Refreshes a page's <main data-refresh="ms"> in place (not while a field in it has focus),
// and asks before an action's form is sent.
(function () {
  const main = document.getElementById("main");
  const every = main && Number(main.dataset.refresh);
  if (every > 0) {
    setInterval(async function () {
      if (main.contains(document.activeElement) && document.activeElement !== document.body) return;
      const response = await fetch(location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("main");
      if (fresh) main.innerHTML = fresh.innerHTML;
    }, every);
  }
  document.addEventListener("submit", function (event) {
    const message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });
})();
