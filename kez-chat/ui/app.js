// Placeholder until the front end lands: shows the gateway's hello.
const socket = new WebSocket(new URL("ws", location.href.replace(/^http/, "ws")));
socket.addEventListener("message", (event) => {
  const line = document.createElement("pre");
  line.textContent = event.data;
  document.getElementById("app").append(line);
});
