// The login form: the daemon checks the key (and sets the cookie that opens the pages);
// the key itself is kept in this origin's storage, for the dashboard's calls (api.js).
const KEY = "pcrt-api-key";
const form = document.querySelector("form");
const wrong = document.getElementById("wrong");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = form.elements.key.value.trim();
  const answer = await fetch("/ui/login", {
    method: "POST",
    body: new URLSearchParams({ key }),
    credentials: "same-origin",
  });
  if (answer.ok) {
    window.localStorage.setItem(KEY, key);
    window.location.assign("/ui/");
  } else {
    wrong.hidden = false;
    form.elements.key.select();
  }
});
